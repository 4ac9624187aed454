"""Qwen2 / Qwen2.5: Llama anatomy with q/k/v biases (carried by the projections themselves)."""

from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from saisa.components.backbones.base import DecoderFamily, register_decoder_family

register_decoder_family(DecoderFamily("qwen2", apply_rotary_pos_emb), "qwen2")
