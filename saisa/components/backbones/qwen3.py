"""Qwen3: per-head RMSNorm on keys (k_norm) before RoPE."""

from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from saisa.components.backbones.base import DecoderFamily, register_decoder_family

register_decoder_family(DecoderFamily("qwen3", apply_rotary_pos_emb, has_k_norm=True), "qwen3")
