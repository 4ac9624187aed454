"""Attention functions that prepend one layer's visual K/V to the text K/V (SAISA's training path).

With a KV cache the visual K/V simply sit in the cache. Without one (training, where gradient checkpointing drops
caches) the `saisa_visual_kv` keyword, which transformers forwards untouched from the decoder's `forward` to the
registered attention function, carries a function of the layer index: each layer computes its own visual K/V inside
its own forward, where FSDP and ZeRO-3 have gathered that layer's parameters, and activation checkpointing recomputes
them instead of keeping them.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

VISUAL_KV_KWARG = "saisa_visual_kv"
INNER_IMPLEMENTATIONS = {"sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"], "eager": eager_attention_forward}


def _with_visual_kv(inner):
    def attention(module, query, key, value, attention_mask, **kwargs):
        visual_kv = kwargs.pop(VISUAL_KV_KWARG, None)
        if visual_kv is not None:
            visual_keys, visual_values = visual_kv(module.layer_idx)  # (B, kv_heads, Vb, head_dim) each
            key = torch.cat([visual_keys, key], dim=2)
            value = torch.cat([visual_values, value], dim=2)
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


def saisa_attention_name(inner: str) -> str:
    if inner not in INNER_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {inner!r} is not supported: SAISA needs arbitrary masks, use one of "
            f"{sorted(INNER_IMPLEMENTATIONS)}"
        )
    return f"saisa_{inner}"


for _name, _inner in INNER_IMPLEMENTATIONS.items():
    AttentionInterface.register(f"saisa_{_name}", _with_visual_kv(_inner))
    AttentionMaskInterface.register(f"saisa_{_name}", ALL_MASK_ATTENTION_FUNCTIONS[_name])
