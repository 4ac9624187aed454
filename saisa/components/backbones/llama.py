"""Llama family: Llama 1-3, Vicuna, SmolLM2 (model_type llama) and Mistral (same layer anatomy)."""

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from saisa.components.backbones.base import DecoderFamily, register_decoder_family

register_decoder_family(DecoderFamily("llama", apply_rotary_pos_emb), "llama", "mistral")
