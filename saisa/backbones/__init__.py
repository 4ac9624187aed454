"""Decoder-LLM families. SAISA drives an unmodified transformers LLM through its public pieces: each decoder
layer's input norm and K/V projections (plus k-norm where the family has one) and the model's rotary embedding.
A family is one small file that registers a `DecoderFamily`; most are the Llama recipe with another name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    # (q, k, cos, sin) -> (q_rot, k_rot) on (N, heads, seq, head_dim); the family's own RoPE function.
    apply_rotary_pos_emb: Callable
    has_k_norm: bool = False  # Qwen3-style per-head RMSNorm on keys, applied before RoPE

    def decoder(self, language_model: PreTrainedModel) -> nn.Module:
        """The decoder (e.g. `LlamaModel`) of a causal LM, or the decoder itself."""
        return language_model if hasattr(language_model, "layers") else language_model.model

    def layers(self, language_model: PreTrainedModel) -> nn.ModuleList:
        return self.decoder(language_model).layers

    def visual_keys_values(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAISA.md §3 for one layer: visual features already in the layer's input space -> its K and V.

        x: (N, v, h). Returns keys before RoPE and values, each (N, kv_heads, v, head_dim).
        """
        attn = layer.self_attn
        normed = layer.input_layernorm(x)
        shape = (*x.shape[:-1], -1, attn.head_dim)  # (N, v, kv_heads, head_dim)
        keys = attn.k_proj(normed).view(shape)
        if self.has_k_norm:
            keys = attn.k_norm(keys)
        values = attn.v_proj(normed).view(shape)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def rotate_keys(self, language_model: PreTrainedModel, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """keys (B, kv_heads, n, head_dim) rotated at positions (B, n)."""
        cos, sin = self.decoder(language_model).rotary_emb(keys, positions)  # (B, n, head_dim) each
        # The family's function rotates a query too: give it one head's worth, not a second copy of the keys.
        _, rotated = self.apply_rotary_pos_emb(keys[:, :1], keys, cos, sin)
        return rotated


DECODER_FAMILIES: dict[str, DecoderFamily] = {}


def register_decoder_family(family: DecoderFamily, *model_types: str) -> DecoderFamily:
    for model_type in model_types:
        DECODER_FAMILIES[model_type] = family
    return family


def decoder_family(config: PreTrainedConfig) -> DecoderFamily:
    try:
        return DECODER_FAMILIES[config.model_type]
    except KeyError:
        raise ValueError(
            f"unsupported LLM backbone {config.model_type!r}; supported: {sorted(DECODER_FAMILIES)} "
            "(add one with saisa.backbones.register_decoder_family)"
        ) from None


from saisa.backbones import llama, qwen2, qwen3  # noqa: E402,F401  (registers the built-in families)
