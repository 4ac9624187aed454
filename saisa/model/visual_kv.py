"""SAISA's visual keys and values (SAISA.md §3), in one place. For decoder layer l and the images' patch features
v_feats (each step's function on the right):

    x_l = P_l(v_feats)                  the layer's own projector, into its input space     `project`
    n_l = input_layernorm_l(x_l)                                                             `normed_layer_input`
    K_l = k_norm(k_proj_l(n_l))         k_norm only where the family has one                 `visual_keys_values`
    V_l = v_proj_l(n_l)                                                                      `visual_keys_values`
    K_l = RoPE(K_l)                     at the images' positions                             `rotate_keys`

Visual tokens are keys and values only. Before RoPE, K and V depend on the image and the weights alone, which is what
lets an image KV cache keep them; rotation at wherever the image sits comes last. `VisualPrefix.layer(l)` makes one
layer's K/V for the batch when asked: in training from inside that layer's own forward (so FSDP and ZeRO-3 have
gathered its parameters, and one layer's exist at a time), with a KV cache for every layer before the text runs.
On vLLM the equation runs inside vLLM's own layers (`saisa.integrations.vllm.model`): the visual rows hold n_l from
`normed_layer_input`, and vLLM's attention makes K/V and rotates them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from saisa.components.backbones import DecoderFamily
from saisa.components.connectors import MLPProjector
from saisa.model.configuration import SaisaConfig
from saisa.model.image_kv_cache import ImageKV, WeightsVersion, image_key
from saisa.model.layout import SequenceLayout

if TYPE_CHECKING:
    from saisa.model.modeling import SaisaModel

KVForLayer = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index -> that layer's keys, values


# -- the equation ------------------------------------------------------------------------------------------------------
def add_projectors(owner: nn.Module, config: SaisaConfig, vision_hidden_size: int) -> None:
    """Give `owner` (the transformers model or the vLLM one) its projector(s): `layer_projectors`, one per decoder layer
    (`config.per_layer_projectors`), or one `projector`. The attribute names are the checkpoints' key prefixes."""
    text_hidden_size = config.text_config.hidden_size

    def projector() -> MLPProjector:
        return MLPProjector(
            vision_hidden_size, text_hidden_size, act=config.projector_hidden_act, bias=config.projector_bias
        )

    if config.per_layer_projectors:
        owner.layer_projectors = nn.ModuleList(projector() for _ in range(config.text_config.num_hidden_layers))
    else:
        owner.projector = projector()


def projectors(owner: nn.Module) -> nn.Module:
    """Every projector `add_projectors` gave `owner`, as one module."""
    return owner.layer_projectors if owner.config.per_layer_projectors else owner.projector


def project(owner: nn.Module, features: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """x_l = P_l(v_feats): (..., d_vis) -> (..., h), into decoder layer `layer`'s input space (per-layer projectors), or
    through the one projector (shared by every layer, or into the embedding space) whatever `layer` is."""
    if not owner.config.per_layer_projectors:
        return owner.projector(features)
    if layer is None:
        raise ValueError("this model has one projector per decoder layer: say which layer's input space to project to")
    return owner.layer_projectors[layer](features)


def normed_layer_input(decoder_layer: nn.Module, owner: nn.Module, features: torch.Tensor, layer: int) -> torch.Tensor:
    """n_l = input_layernorm_l(P_l(v_feats)), (..., h): the visual tokens' input to layer `layer`'s attention.
    decoder_layer: that layer (transformers' or vLLM's; both name the norm `input_layernorm`)."""
    return decoder_layer.input_layernorm(project(owner, features, layer))


def visual_keys_values(model: SaisaModel, features: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s keys (before RoPE) and values of every image, (N, kv_heads, v, head_dim) each.
    features: (N, v, d_vis) the images' patch features."""
    decoder_layer = model.family.layers(model.language_model)[layer]
    attn = decoder_layer.self_attn
    normed = normed_layer_input(decoder_layer, model, features, layer)  # (N, v, h)
    shape = (*normed.shape[:-1], -1, attn.head_dim)  # (N, v, kv_heads, head_dim)
    keys = attn.k_proj(normed).view(shape)
    if model.family.has_k_norm:
        keys = attn.k_norm(keys)
    values = attn.v_proj(normed).view(shape)
    return keys.transpose(1, 2), values.transpose(1, 2)


def rotate_keys(
    family: DecoderFamily, language_model: nn.Module, keys: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """keys (B, kv_heads, n, head_dim) rotated at positions (B, n), with the LLM's own rotary embedding."""
    cos, sin = family.decoder(language_model).rotary_emb(keys, positions)  # (B, n, head_dim) each
    # The family's function rotates a query too: give it one head's worth, not a second copy of the keys.
    _, rotated = family.apply_rotary_pos_emb(keys[:, :1], keys, cos, sin)
    return rotated


# -- every image of a forward call -------------------------------------------------------------------------------------
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
        or each layer's backward would run through the vision tower's graph again (`saisa.model.attention`)."""
        self._features_in_use = features
        try:
            yield
        finally:
            self._features_in_use = None

    def __call__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(layer_idx)

    def layer(
        self, layer_idx: int, kept: tuple[SequenceLayout, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s keys (rotated at the images' positions) and values, (B, kv_heads, Vb, head_dim) each.

        kept: only some visual tokens of each image (`saisa.model.pruning`): the pruned layout and each image's kept
        tokens (N, k); then only their K/V are made (from the kept features where the images were encoded)."""
        seq, offsets = kept if kept is not None else (self.seq, None)
        features = self._features_in_use if self._features_in_use is not None else self.features
        if self._features_in_use is not None or (offsets is not None and features is not None):
            if offsets is not None:  # (N, v, d_vis) -> (N, k, d_vis)
                features = features.gather(1, offsets[..., None].expand(-1, -1, features.shape[-1]))
            k, v = visual_keys_values(self.model, features, layer_idx)  # (N, kv_heads, v or k, head_dim) each
        else:
            k, v = self.before_rope(layer_idx)
            if offsets is not None:  # (N, kv_heads, v, head_dim) -> (N, kv_heads, k, head_dim)
                index = offsets[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
                k, v = k.gather(2, index), v.gather(2, index)
        k = seq.scatter_images(k.transpose(1, 2)).transpose(1, 2)  # (B, kv_heads, Vb, head_dim)
        v = seq.scatter_images(v.transpose(1, 2)).transpose(1, 2)
        model = self.model
        return rotate_keys(model.family, model.language_model, k, seq.visual_positions), v


def images_keys_values(model: SaisaModel, pixel_values: torch.Tensor) -> tuple[KVForLayer, torch.Tensor | None]:
    """layer index -> that layer's keys (before RoPE) and values of every image, (N, kv_heads, v, head_dim) each; and
    the images' patch features (N, v, d_vis) where they were all encoded (else None).

    Computed when a layer asks; with an image KV cache (`model.image_kv_cache`) every layer's are served per image from
    the cache where possible, under the current weights version.
    """
    cache = model.image_kv_cache
    version = _weights_version(model, pixel_values) if cache is not None else None
    if version is None:
        features = model.encode_images(pixel_values)
        return partial(visual_keys_values, model, features), features
    model.check_pixel_values(pixel_values)
    keys = [image_key(p) for p in pixel_values.detach().cpu()]
    # a repeat in the batch: looked up once
    found: dict[str, ImageKV | None] = {key: cache.get(key, version) for key in dict.fromkeys(keys)}
    missing = [key for key, layers in found.items() if layers is None]
    if missing:
        features = model.encode_images(pixel_values[[keys.index(key) for key in missing]])
        num_layers = len(model.family.layers(model.language_model))
        fresh = [visual_keys_values(model, features, layer) for layer in range(num_layers)]  # (M, kv_heads, v, hd)
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
    modules = [model.vision_tower, projectors(model)]
    for layer in model.family.layers(model.language_model):
        modules += (layer.input_layernorm, layer.self_attn)
    version = WeightsVersion.of(modules)
    if version is None or (torch.is_grad_enabled() and (version.requires_grad or pixel_values.requires_grad)):
        return None
    return version
