"""SAISA's visual K/V inside each decoder layer, whatever attention implementation the LLM runs.

The LLM keeps transformers' own attention, chosen the transformers way (`attn_implementation="sdpa"` or `"eager"`,
`set_attn_implementation`). Each of its attention modules gets a forward pre-hook (`install_visual_kv_hooks`). When
the decoder's forward carries the `saisa_visual_kv` keyword (transformers forwards extra keywords untouched from the
decoder to every layer's attention module), the hook asks it for that layer's visual K/V, so they are computed inside
the layer's own forward: where FSDP and ZeRO-3 have gathered the layer's parameters, where offloading hooks have put
them on the execution device, and inside what activation checkpointing recomputes. They reach the attention through
its cache argument:
- with a KV cache (generation) they are written into it before the layer's text K/V (a per-layer KV prefix);
- without one (training; gradient checkpointing drops caches) a one-call stand-in prepends them to the text K/V.

In an inference prefill with visual pruning (`saisa.model.pruning`) the hook hands the layer to the call's
`PruningPass` (the `saisa_visual_pruning` keyword) instead: it scores, selects and puts the layer's pruned mask in
place, and gives SAISA's visual K/V (of the kept tokens only, after a fastv score layer).

Activation checkpointing (`checkpoint_with_visual_inputs`) hands each layer the images' features as one more input.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn

from saisa.compat import CACHE_KWARG
from saisa.model.pruning import PRUNING_KWARG

if TYPE_CHECKING:
    from saisa.model.pruning import PruningPass
    from saisa.model.visual_kv import KVForLayer

VISUAL_KV_KWARG = "saisa_visual_kv"


class _PrefixOnly:
    """Stands in for the KV cache of one attention call: the text K/V of this call follow the layer's visual K/V."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=2), torch.cat([self.values, value_states], dim=2)


def _visual_kv_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    visual_kv: KVForLayer | None = kwargs.pop(VISUAL_KV_KWARG, None)  # (B, kv_heads, Vb, head_dim) each
    pruning: PruningPass | None = kwargs.pop(PRUNING_KWARG, None)
    if pruning is not None:  # it holds SAISA's visual K/V, and may change the layer's mask
        visual = pruning.before_attention(module, kwargs)
    elif visual_kv is not None:
        visual = visual_kv(module.layer_idx)
    else:
        return None
    if visual is None:  # LLaVA / NAAViT: their visual tokens are in the hidden sequence
        return args, kwargs
    keys, values = visual  # (B, kv_heads, visual slots, head_dim) each
    cache = kwargs.get(CACHE_KWARG)
    if cache is not None:
        cache.update(keys, values, module.layer_idx)
    else:
        kwargs[CACHE_KWARG] = _PrefixOnly(keys, values)
    return args, kwargs


def install_visual_kv_hooks(layers: nn.ModuleList) -> None:
    for layer in layers:
        attention = layer.self_attn
        if not getattr(attention, "_saisa_visual_kv_hook", False):
            attention.register_forward_pre_hook(_visual_kv_pre_hook, with_kwargs=True)
            attention._saisa_visual_kv_hook = True


_ACTIVE_PREFIX: ContextVar = ContextVar("saisa_visual_prefix", default=None)


@contextmanager
def visual_prefix_active(prefix):
    """Within: the decoder runs with `prefix` (a `VisualPrefix`) giving its layers their visual K/V."""
    token = _ACTIVE_PREFIX.set(prefix)
    try:
        yield
    finally:
        _ACTIVE_PREFIX.reset(token)


def checkpoint_with_visual_inputs(checkpoint: Callable) -> Callable:
    """transformers' per-layer checkpoint function, with the images' features (which every layer's visual K/V come
    from) as one more input of each checkpointed layer. Reentrant checkpointing detaches a layer's inputs and nothing
    else: features reached another way would keep their graph, and every layer's backward would run through the vision
    tower's graph again (PyTorch: "Trying to backward through the graph a second time")."""

    def run(function, *args):
        prefix = _ACTIVE_PREFIX.get()
        features = getattr(prefix, "features", None)
        if features is None or not features.requires_grad:
            return checkpoint(function, *args)

        def layer(*inputs):  # also what the backward pass recomputes, with the same prefix
            with prefix.features_as(inputs[-1]):
                return function(*inputs[:-1])

        return checkpoint(layer, *args, features)

    return run
