"""SAISA's visual prefix (SAISA.md §3), in one place. For decoder layer l and the images' patch features v_feats:

    x_l = P_l(v_feats)                          the layer's own projector, into its input space
    n_l = input_layernorm_l(x_l)
    K_l = RoPE(k_norm(k_proj_l(n_l)))           at the images' positions (k_norm only where the family has one)
    V_l = v_proj_l(n_l)

Visual tokens are keys and values only. Before RoPE, K and V depend on the image and the weights alone, which is what
lets an image KV cache keep them; rotation at wherever the image sits comes last. `VisualPrefix.layer(l)` makes one
layer's K/V for the batch when asked: in training from inside that layer's own forward (so FSDP and ZeRO-3 have
gathered its parameters, and one layer's exist at a time), with a KV cache for every layer before the text runs.
On vLLM the same equation runs inside vLLM's own layers (`saisa.integrations.vllm.model`): the visual rows hold x_l.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch

from saisa.modeling.image_kv_cache import WeightsVersion, image_key
from saisa.modeling.layout import SequenceLayout

if TYPE_CHECKING:
    from saisa.modeling.saisa_model import SaisaModel

LayerKV = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index -> keys, values


class VisualPrefix:
    """Every image of one forward call, as per-layer keys and values in the batch's visual block."""

    def __init__(self, model: SaisaModel, pixel_values: torch.Tensor, seq: SequenceLayout):
        self.model, self.seq = model, seq
        # features: (N, v, d_vis) the images' patch features, None where the image KV cache served every image
        self.before_rope, self.features = images_keys_values(model, pixel_values)
        self._features_in_use: torch.Tensor | None = None

    @contextmanager
    def features_as(self, features: torch.Tensor):
        """Within: layers make their K/V from `features` (the same values as `self.features`, another autograd node).
        Reentrant activation checkpointing detaches a layer's inputs, and only those: the features must be one of them,
        or each layer's backward would run through the vision tower's graph again (`saisa.modeling.attention`)."""
        self._features_in_use = features
        try:
            yield
        finally:
            self._features_in_use = None

    def __call__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(layer_idx)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s keys (rotated at the images' positions) and values, (B, kv_heads, Vb, head_dim) each."""
        if self._features_in_use is not None:
            k, v = layer_keys_values(self.model, self._features_in_use, layer_idx)  # (N, kv_heads, v, head_dim) each
        else:
            k, v = self.before_rope(layer_idx)
        k = self.seq.scatter_images(k.transpose(1, 2)).transpose(1, 2)  # (B, kv_heads, Vb, head_dim)
        v = self.seq.scatter_images(v.transpose(1, 2)).transpose(1, 2)
        model = self.model
        return model.family.rotate_keys(model.language_model, k, self.seq.visual_positions), v


def layer_keys_values(model: SaisaModel, features: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer_idx`'s keys (before RoPE) and values of every image, (N, kv_heads, v, head_dim) each."""
    layer = model.family.layers(model.language_model)[layer_idx]
    return model.family.visual_keys_values(layer, model.project_visual_features(features, layer_idx))


def images_keys_values(model: SaisaModel, pixel_values: torch.Tensor) -> tuple[LayerKV, torch.Tensor | None]:
    """layer index -> that layer's keys (before RoPE) and values of every image, (N, kv_heads, v, head_dim) each; and
    the images' patch features (N, v, d_vis) where they were all encoded (else None).

    Computed when a layer asks; with an image KV cache (`model.image_kv_cache`) every layer's are served per image from
    the cache where possible, under the current weights version.
    """
    cache = model.image_kv_cache
    version = _weights_version(model, pixel_values) if cache is not None else None
    if version is None:
        features = model.encode_images(pixel_values)
        return partial(layer_keys_values, model, features), features
    model._check_pixel_values(pixel_values)
    keys = [image_key(p) for p in pixel_values.detach().cpu()]
    found = {key: cache.get(key, version) for key in dict.fromkeys(keys)}  # a repeat in the batch: looked up once
    missing = [key for key, layers in found.items() if layers is None]
    if missing:
        features = model.encode_images(pixel_values[[keys.index(key) for key in missing]])
        num_layers = len(model.family.layers(model.language_model))
        fresh = [layer_keys_values(model, features, layer) for layer in range(num_layers)]  # (M, kv_heads, v, hd)
        for j, key in enumerate(missing):
            found[key] = [(k[j], v[j]) for k, v in fresh]
            cache.put(key, found[key], version)  # copies: the cache never holds a view into `fresh`
        if len(missing) == len(keys):  # every image new and distinct: the batch as computed
            return fresh.__getitem__, features
    per_image = [found[key] for key in keys]
    if len(per_image) == 1:  # views, no copy
        return (lambda layer: (per_image[0][layer][0][None], per_image[0][layer][1][None])), None
    return (
        lambda layer: (
            torch.stack([image[layer][0] for image in per_image]),
            torch.stack([image[layer][1] for image in per_image]),
        )
    ), None


def _weights_version(model: SaisaModel, pixel_values: torch.Tensor) -> WeightsVersion | None:
    """The version of every weight the images' visual K/V come from (the vision encoder, the projectors, each layer's
    input norm and attention, whose k/v projections and k-norm are inside), or None where the image KV cache must not
    be used: in training mode (dropout), when gradients must reach those weights or the pixels (cached K/V are
    constants), or when the version cannot be known (weights made under torch.inference_mode)."""
    if model.training:
        return None
    projectors = model.layer_projectors if hasattr(model, "layer_projectors") else model.projector
    modules = [model.vision_tower, projectors]
    for layer in model.family.layers(model.language_model):
        modules += (layer.input_layernorm, layer.self_attn)
    version = WeightsVersion.of(modules)
    if version is None or (torch.is_grad_enabled() and (version.requires_grad or pixel_values.requires_grad)):
        return None
    return version
