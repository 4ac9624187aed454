"""`SaisaModel` and `SaisaForConditionalGeneration`: SAISA, LLaVA-1.5 and NAAViT over an unmodified transformers decoder
LLM, laid out as transformers' Llava: `SaisaModel` (vision tower, projector(s), the decoder LLM without its head) and
`SaisaForConditionalGeneration` (`model` + `lm_head`). Saved folders use flat key names
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`, `layer_projectors.*`): transformers renames
them on load and back on save through the conversion mapping registered below, as it does for Llava.

Reading guide (SAISA.md §3):
- the three architectures ..... `saisa.model.architectures` (what each does differently, read as `config.arch`)
- per-layer projection ........ `saisa.model.visual_kv.project` (one MLP per layer, or one shared)
- visual K/V .................. `saisa.model.visual_kv` (per layer: projector, the layer's norm and K/V
                                projections, RoPE at the images' positions)
- positions and the mask ...... `saisa.model.layout`
- LLaVA / NAAViT baselines .... `_forward_embedding_space` (visual tokens spliced into the input embeddings)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from saisa.compat import CACHE_KWARG
from saisa.components.backbones import decoder_family
from saisa.components.connectors import MLPProjector
from saisa.components.encoders import build_vision_encoder
from saisa.model.architectures import architecture_named
from saisa.model.attention import (
    VISUAL_KV_KWARG,
    checkpoint_with_visual_inputs,
    install_visual_kv_hooks,
    visual_prefix_active,
)
from saisa.model.cache import SaisaCache
from saisa.model.configuration import SaisaConfig
from saisa.model.feature_cache import VisionFeatureCache
from saisa.model.image_kv_cache import ImageKVCache
from saisa.model.layout import KeyLayout, SequenceLayout, attention_mask_4d, sequence_layout
from saisa.model.pruning import PRUNING_KWARG, PruningPass
from saisa.model.visual_kv import VisualPrefix, add_projectors, project
from saisa.processing.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


# Saved folders' flat keys -> this layout; `save_pretrained` writes the flat names back (transformers'
# `save_original_format`), the names every saisa folder and the vLLM plugin read. Two steps, as transformers' Llava
# mapping: the model-level renames, then `SaisaModel`'s own (scoped to it).
register_checkpoint_conversion_mapping(
    "SaisaForConditionalGeneration",
    [
        WeightRenaming(source_patterns=r"^language_model.lm_head", target_patterns="lm_head"),
        WeightRenaming(source_patterns=r"^language_model", target_patterns="model.language_model"),
        WeightRenaming(source_patterns=r"^vision_tower", target_patterns="model.vision_tower"),
        WeightRenaming(source_patterns=r"^layer_projectors", target_patterns="model.layer_projectors"),
        WeightRenaming(source_patterns=r"^projector", target_patterns="model.projector"),
    ],
    overwrite=True,
)
register_checkpoint_conversion_mapping(
    "SaisaModel",
    [WeightRenaming(source_patterns=r"^language_model.model", target_patterns="language_model")],
    overwrite=True,
)
_LEGACY_PREFIXES = [  # (saved folders, this layout) for plain state dicts
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("layer_projectors.", "model.layer_projectors."),
    ("projector.", "model.projector."),
]


def from_legacy_keys(state: dict) -> dict:
    """A state dict in the key names saved folders use -> `SaisaForConditionalGeneration` names."""
    return {_swap_prefix(key, _LEGACY_PREFIXES): value for key, value in state.items()}


def to_legacy_keys(state: dict) -> dict:
    """`SaisaForConditionalGeneration.state_dict()` names -> the names saved folders use."""
    return {_swap_prefix(key, [(new, old) for old, new in _LEGACY_PREFIXES]): value for key, value in state.items()}


def _swap_prefix(key: str, prefixes: list[tuple[str, str]]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def loss_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    image_token_id: int,
    architecture: str,
) -> torch.Tensor:
    """labels (B, T) with IGNORE_INDEX wherever no query predicts the token: column 0, padding, image placeholders and,
    in SAISA, the token right after an image (a visual token issues no query).

    The training collator applies this too, so the label count transformers' Trainer takes for `num_items_in_batch`
    is exactly the count the loss averages over. A plain function, so data-loader workers need not hold the model.
    """
    is_image = input_ids == image_token_id
    ignore = is_image | ~attention_mask.bool()
    ignore[:, 0] = True
    if architecture_named(architecture).visual_keys_values_only:
        ignore[:, 1:] |= is_image[:, :-1]
    return labels.masked_fill(ignore, IGNORE_INDEX)


@dataclass
class SaisaModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` (one row per `input_ids` column, as the logits) plus the images' outputs, as Llava's.

    image_hidden_states: (N, v, h) the images' visual tokens in the LLM's embedding space (LLaVA / NAAViT); None for
        SAISA, whose visual tokens are each layer's own projection (`SaisaModel.get_image_features(layer=...)`).
    image_outputs: the vision tower's output: `last_hidden_state` (N, v, d_vis) patch features, `pooler_output` the
        images' projected features one tensor (v, h) per image (LLaVA / NAAViT); None when no image was encoded.
    """

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class SaisaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_hidden_states` and `image_outputs` (see `SaisaModelOutputWithPast`)."""

    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


class SaisaPreTrainedModel(PreTrainedModel):
    config_class = SaisaConfig
    config: SaisaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # sdpa (default) and eager, as transformers selects them; kernels that take no arbitrary mask (flash) cannot serve
    # the visual keys and NAAViT's pattern
    _supports_sdpa = True
    _supports_attention_backend = True
    # accelerate's device hooks leave the KV cache argument alone: each layer's entries sit on that layer's device
    _skip_keys_device_placement = [CACHE_KWARG]
    accepts_loss_kwargs = True  # forward normalises by `num_items_in_batch` (transformers' Trainer contract)
    # `_no_split_modules` (device_map, FSDP): transformers' post_init gathers the LLM's and the vision tower's own

    # transformers' private hook that initialises the weights a checkpoint does not hold; only the projectors are ours,
    # the LLM (head included) and the vision encoder initialise themselves
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MLPProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # transformers saves back only the renames that matched on load; ours must all apply on save, whatever the
        # folder held (a projector-only folder whose model gained per-layer projectors, one saved without renames)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._weight_conversions = None
        return loaded

    # the private hook `gradient_checkpointing_enable` installs each layer's checkpoint function through: ours also
    # hands every checkpointed layer the images' features (`checkpoint_with_visual_inputs`)
    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        super()._set_gradient_checkpointing(
            enable, checkpoint_with_visual_inputs(gradient_checkpointing_func), **kwargs
        )


class SaisaModel(SaisaPreTrainedModel):
    """The vision tower, the projector(s) and the decoder LLM without its head (`language_model`, e.g. a `LlamaModel`).

    Its output has one row per `input_ids` column (a placeholder's row: what its image's last visual token gives in
    LLaVA / NAAViT; in SAISA an image's placeholder is an inert column, as in the logits)."""

    def __init__(
        self, config: SaisaConfig, *, language_model: nn.Module | None = None, vision_model: nn.Module | None = None
    ):
        super().__init__(config)
        self.family = decoder_family(config.text_config)
        # registered first: parameters list (and state dicts) in saved folders' order, LLM, tower, projectors
        self.language_model = (
            language_model if language_model is not None else AutoModel.from_config(config.text_config)
        )
        self.vision_tower = build_vision_encoder(
            config.vision_config,
            feature_layer=config.vision_feature_layer,
            select_strategy=config.vision_feature_select_strategy,
            module=vision_model,
        )
        add_projectors(self, config, self.vision_tower.hidden_size)
        install_visual_kv_hooks(self.family.layers(self.language_model))
        # An LLM or encoder built before this model: making SaisaConfig around their configs reset their attention
        # choice (transformers passes a composite config's choice down to its sub-configs); give them this model's.
        for part in (self.language_model, getattr(self.vision_tower, "model", None)):
            if isinstance(part, PreTrainedModel) and part.config._attn_implementation is None:
                part.set_attn_implementation(self.config._attn_implementation)
        # Optional, inference only: per-image visual K/V reused across requests (`saisa.model.image_kv_cache`).
        self.image_kv_cache: ImageKVCache | None = None
        # Optional: a frozen encoder's features kept on disk across runs (`saisa.model.feature_cache`).
        self.vision_feature_cache: VisionFeatureCache | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.vision_tower.parameters()):
            self.vision_tower.eval()  # a frozen encoder keeps its batch-norm statistics and no dropout
        return self

    @property
    def tokens_per_image(self) -> int:
        return self.vision_tower.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, v, d_vis) patch features, on the vision encoder's execution device and in its dtype."""
        self.check_pixel_values(pixel_values)
        weight = next(self.vision_tower.parameters())
        pixel_values = pixel_values.to(device=execution_device(self.vision_tower), dtype=weight.dtype)
        if self.vision_feature_cache is not None:
            return self.vision_feature_cache.encode(self.vision_tower, pixel_values)
        return self.vision_tower(pixel_values)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        layer: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """As Llava's: `last_hidden_state` (N, v, d_vis) the vision tower's patch features, `pooler_output` one (v, h)
        tensor per image, projected into the embedding space (LLaVA / NAAViT) or into layer `layer`'s input space
        (SAISA; default layer 0); the vision encoder's hidden states and attentions when asked for."""
        vision = self.config.vision_config
        self.check_pixel_values(pixel_values)
        weight = next(self.vision_tower.parameters())
        out = self.vision_tower.encode(
            pixel_values.to(device=execution_device(self.vision_tower), dtype=weight.dtype),
            output_hidden_states=bool(
                output_hidden_states if output_hidden_states is not None else vision.output_hidden_states
            ),
            output_attentions=bool(output_attentions if output_attentions is not None else vision.output_attentions),
        )
        if layer is None and self.config.per_layer_projectors:
            layer = 0
        out.pooler_output = list(project(self, out.last_hidden_state, layer))
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()

    def _ids_of_embeds(self, inputs_embeds: torch.Tensor, *, images: bool) -> torch.Tensor:
        """(B, T) ids standing for inputs_embeds (B, T, h): 0 for text (only the layout reads them), and, as Llava finds
        them, `image_token_id` where a row is that id's embedding."""
        ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if not images:
            return ids
        image_id, vocab = self.config.image_token_id, self.config.text_config.vocab_size
        if not 0 <= image_id < vocab:
            raise ValueError(
                f"with pixel_values, give input_ids: the image placeholder id {image_id} has no embedding to find the "
                "images' places in inputs_embeds by"
            )
        embedding = self.get_input_embeddings()(
            torch.tensor(image_id, device=execution_device(self.get_input_embeddings()))
        )
        return ids.masked_fill((inputs_embeds == embedding.to(inputs_embeds)).all(-1), image_id)

    def _phantom_image(self) -> torch.Tensor | None:
        """In training, a batch without images still runs one blank image through every visual weight, with no
        visual tokens (`SequenceLayout.scatter_images` keeps zero of its slots): every rank then calls the same
        modules in the same order and gets a (zero) gradient for each, as ZeRO-3's gathers and FSDP's reductions
        need when another rank's batch holds images (as LLaVA's own training does). None outside training."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        size = self.vision_tower.preprocessing.image_size
        return torch.zeros(1, 3, size, size)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raises unless pixel_values are (N, 3, S, S) for this vision encoder's S."""
        size = self.vision_tower.preprocessing.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {size}, {size}) for this vision encoder, got "
                f"{tuple(pixel_values.shape)}; prepare images with SaisaProcessor"
            )

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels_given: bool = False,
        **kwargs,
    ) -> SaisaModelOutputWithPast | tuple:
        """input_ids (B, T) with `image_token_id` once per image; pixel_values (N, 3, S, S), every image of the batch
        in order; attention_mask (B, T) or (B, cached + T) for the new tokens (1 = real, 0 = padding). inputs_embeds
        (B, T, h) instead of input_ids: text only (images are placed by their ids). position_ids (B, T): optional, and
        where given they must be the positions the model computes from the images' places (each image takes v, padding
        none, counting on from what the cache holds); only the real text columns are compared.

        hidden_states: the LLM's (embeddings, then each layer's output), each (B, T, h), one row per input column as
        `last_hidden_state`. attentions (eager attention only, as in transformers): per layer (B, heads, T, K) with
        the same rows; the K columns are the layer's keys in the order the model holds them: cached entries, then
        this call's visual block (each image's v visual tokens, the batch's images padded to the same count), then
        this call's input columns. In SAISA the visual columns are the visual keys every text query attends to (with
        fastv visual pruning, after its score layer: each image's kept keys only, `saisa.model.pruning`)."""
        cfg = self.config
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        cache = self._saisa_cache(cache if cache is not None else past_key_values)
        if use_cache is None:
            # a loss evaluation keeps no cache: nothing reuses it, and each layer then makes its own visual K/V inside
            # its forward (where FSDP/ZeRO-3 have gathered it), as in training
            use_cache = cache is not None or (not self.training and not labels_given and cfg.text_config.use_cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids is None:
            input_ids = self._ids_of_embeds(inputs_embeds, images=pixel_values is not None)
        batch, length = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]

        prior = self._cached_layout(cache, batch, input_ids.device)
        seq = sequence_layout(
            input_ids,
            attention_mask,
            image_token_id=cfg.image_token_id,
            tokens_per_image=self.tokens_per_image,
            start_positions=prior.next_position,
        )
        self._check_inputs(input_ids, seq, pixel_values, check_ids=inputs_embeds is None)
        if position_ids is not None:
            _check_position_ids(position_ids, seq)
        if use_cache and cache is None:
            cache = SaisaCache(config=cfg.text_config)

        layout_after = prior.extend(seq)  # kept on the inputs' device, where the next call's layout is computed
        # The layout is computed where input_ids are; the modules get everything on their own execution device.
        device = execution_device(self.get_input_embeddings())
        seq, keys = seq.to(device), layout_after.to(device)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

        if inputs_embeds is None:
            # the placeholder id need not be in the vocabulary; where it is, its (inert) row is embedded as given, as it
            # is when inputs_embeds are given
            in_vocab = 0 <= cfg.image_token_id < cfg.text_config.vocab_size
            text_ids = input_ids if in_vocab else input_ids.masked_fill(seq.is_image, 0)
            inputs_embeds = self.get_input_embeddings()(text_ids)  # (B, T, h)
        else:
            inputs_embeds = inputs_embeds.to(device)
        images = pixel_values if seq.num_images else self._phantom_image()
        # Visual pruning (`saisa.model.pruning`): an inference call that prefills images; never in training or a loss.
        pruning = cfg.pruning if seq.num_images and not self.training and not labels_given else None
        entries_before = cache.entries() if cache is not None else None
        run = dict(
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        image_outputs = image_hidden_states = pruner = None
        try:
            if images is None and prior.positions.shape[1] == 0:
                # Text only, nothing cached: exactly the bare LLM.
                out = self._decoder(inputs_embeds, attention_mask, seq.text_positions, **run)
            elif cfg.arch.visual_keys_values_only:
                prefix = VisualPrefix(self, images, seq) if images is not None else None
                pruner = self._pruner(pruning, seq, prior, prefix)
                out = self._forward_saisa(seq, keys, prior, prefix, inputs_embeds, pruner, **run)
                if prefix is not None and prefix.features is not None and seq.num_images:
                    with (
                        torch.no_grad()
                    ):  # for inspection, as Llava's: layer 0's visual inputs (each layer has its own)
                        first = list(project(self, prefix.features, 0))
                    image_outputs = BaseModelOutputWithPooling(last_hidden_state=prefix.features, pooler_output=first)
            else:
                features = self.encode_images(images) if images is not None else None
                pruner = self._pruner(pruning, seq, prior, None)
                out, projected = self._forward_embedding_space(seq, keys, prior, features, inputs_embeds, pruner, **run)
                if seq.num_images:
                    image_hidden_states = projected
                    image_outputs = BaseModelOutputWithPooling(
                        last_hidden_state=features, pooler_output=list(projected)
                    )
            if pruner is not None:  # the cache keeps the kept visual entries only
                layout_after = pruner.compact(cache).to(layout_after.positions.device)
        except BaseException:
            if cache is not None:  # a failed call leaves the cache as it found it, in step with its layout
                cache.truncate(entries_before)
            raise
        if cache is not None:
            cache.layout = layout_after
        output = SaisaModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=image_hidden_states,
            image_outputs=image_outputs,
            **{CACHE_KWARG: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _pruner(
        self, pruning, seq: SequenceLayout, prior: KeyLayout, prefix: VisualPrefix | None
    ) -> PruningPass | None:
        if pruning is None:
            return None
        return PruningPass(
            pruning, family=self.family, seq=seq, prior=prior.to(seq.text_positions.device), prefix=prefix
        )

    def _forward_saisa(
        self,
        seq: SequenceLayout,
        keys: KeyLayout,
        prior: KeyLayout,
        prefix: VisualPrefix | None,
        text_embeds,
        pruner: PruningPass | None,
        **run,
    ) -> BaseModelOutputWithPast:
        """Text runs through the unchanged LLM; each layer's key/value set gains that layer's visual K/V, made inside
        the layer (`saisa.model.attention`): into the KV cache before the text's with one, else for this call. With
        visual pruning the call's `PruningPass` hands each layer its K/V and mask."""
        mask = attention_mask_4d(
            query_positions=seq.text_positions,
            query_is_visual=torch.zeros_like(seq.is_image),
            keys=keys,
            first_query_key=prior.positions.shape[1] + seq.block_size,
            no_visual_to_visual=False,
            dtype=text_embeds.dtype,
        )
        if prefix is None:
            return self._decoder(text_embeds, mask, seq.text_positions, **run)
        visual = {PRUNING_KWARG: pruner} if pruner is not None else {VISUAL_KV_KWARG: prefix}
        with visual_prefix_active(prefix):
            return self._decoder(text_embeds, mask, seq.text_positions, **run, **visual)

    def _forward_embedding_space(
        self,
        seq: SequenceLayout,
        keys: KeyLayout,
        prior: KeyLayout,
        features,
        text_embeds,
        pruner: PruningPass | None,
        **run,
    ) -> tuple[BaseModelOutputWithPast, torch.Tensor | None]:
        """LLaVA-1.5 / NAAViT: projected visual tokens join the input sequence as full tokens (with visual pruning,
        the call's `PruningPass` hides the pruned ones after its score layer). Returns the decoder's output in
        input_ids' layout and the images' projected features (N, v, h)."""
        batch, width = text_embeds.shape[0], text_embeds.shape[-1]
        projected = project(self, features) if features is not None else None  # (N, v, h)
        visual_embeds = (
            seq.scatter_images(projected.to(text_embeds.device, text_embeds.dtype))
            if projected is not None
            else text_embeds.new_zeros(batch, 0, width)
        )  # (B, Vb, h)
        positions = torch.cat([seq.visual_positions, seq.text_positions], 1)
        is_visual = torch.cat([seq.visual_valid, torch.zeros_like(seq.is_image)], 1)
        mask = attention_mask_4d(
            query_positions=positions,
            query_is_visual=is_visual,
            keys=keys,
            first_query_key=prior.positions.shape[1],
            no_visual_to_visual=self.config.arch.no_visual_to_visual,
            dtype=text_embeds.dtype,
        )
        pruning = {PRUNING_KWARG: pruner} if pruner is not None else {}
        out = self._decoder(torch.cat([visual_embeds, text_embeds], 1), mask, positions, **run, **pruning)
        rows = partial(_input_rows, seq)
        out.last_hidden_state = rows(out.last_hidden_state, dim=1)
        if out.hidden_states is not None:
            out.hidden_states = tuple(rows(h, dim=1) for h in out.hidden_states)
        if out.attentions is not None:
            out.attentions = tuple(rows(a, dim=2) if a is not None else None for a in out.attentions)
        return out, projected

    def _decoder(
        self, embeds, mask, positions, *, cache, use_cache, output_attentions, output_hidden_states, **extra
    ) -> BaseModelOutputWithPast:
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{CACHE_KWARG: cache if use_cache else None},
            **extra,
        )

    # -- validation ----------------------------------------------------------------------------------------------------
    def _saisa_cache(self, cache: Cache | None) -> SaisaCache | None:
        """The cache to fill: ours, or a new one in place of the empty `DynamicCache` that `generate` hands over."""
        if cache is None or isinstance(cache, SaisaCache):
            return cache
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            return SaisaCache(config=self.config.text_config)
        raise ValueError(
            f"SAISA models keep their KV cache in a SaisaCache (it also holds the visual keys and their "
            f"layout); got a {type(cache).__name__}"
            + ("" if isinstance(cache, DynamicCache) else ": static and quantized caches are not supported")
        )

    def _cached_layout(self, cache: SaisaCache | None, batch: int, device: torch.device) -> KeyLayout:
        if cache is None or cache.layout is None:
            return KeyLayout.empty(batch, device)
        layout = cache.layout
        if layout.positions.shape[0] != batch:
            raise ValueError(f"the cache holds {layout.positions.shape[0]} sequences but input_ids has {batch}")
        return layout

    def _check_inputs(
        self, input_ids: torch.Tensor, seq: SequenceLayout, pixel_values: torch.Tensor | None, *, check_ids: bool = True
    ) -> None:
        given = 0 if pixel_values is None else pixel_values.shape[0]
        if given != seq.num_images:
            raise ValueError(
                f"input_ids hold {seq.num_images} image placeholder(s) (id {self.config.image_token_id}) but "
                f"pixel_values holds {given} image(s); give exactly one image per placeholder, in order"
            )
        text = input_ids[seq.text_attendable]
        vocab = self.config.text_config.vocab_size
        if check_ids and text.numel() and (text.min() < 0 or text.max() >= vocab):
            raise ValueError(f"input_ids contain ids outside the LLM's vocabulary [0, {vocab})")
        rope = getattr(self.config.text_config, "rope_parameters", None) or getattr(
            self.config.text_config, "rope_scaling", None
        )
        scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default"
        limit = None if scaled else getattr(self.config.text_config, "max_position_embeddings", None)
        longest = int(seq.next_position.max()) if seq.next_position.numel() else 0
        if limit is not None and longest > limit:
            raise ValueError(
                f"sequence too long: {longest} positions (each image takes {self.tokens_per_image}) exceed the "
                f"LLM's maximum of {limit}"
            )


class SaisaForConditionalGeneration(SaisaPreTrainedModel, GenerationMixin):
    """`SaisaModel` plus the LLM's head, as transformers' `LlavaForConditionalGeneration`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(
        self,
        config: SaisaConfig,
        *,
        language_model: PreTrainedModel | None = None,
        vision_model: nn.Module | None = None,
    ):
        """language_model: an already-loaded causal LM (e.g. `LlamaForCausalLM`), split into decoder and head."""
        super().__init__(config)
        if language_model is None:  # a new one, initialised as the LLM initialises itself (its head included)
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        decoder = decoder_family(config.text_config).decoder(language_model)
        self.model = SaisaModel(config, language_model=decoder, vision_model=vision_model)
        self.lm_head = language_model.get_output_embeddings()
        self.post_init()

    @classmethod
    def from_modules(cls, language_model: PreTrainedModel, vision_model: nn.Module, **config_kwargs):
        """Build around an already-loaded LLM and vision encoder (their weights are kept; projectors are new)."""
        vision_config = config_kwargs.pop("vision_config", None) or vision_model.config
        config = SaisaConfig(text_config=language_model.config, vision_config=vision_config, **config_kwargs)
        return cls(config, language_model=language_model, vision_model=vision_model)

    # -- the parts, where they were before `SaisaModel` held them ------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def projector(self) -> MLPProjector:
        return self.model.projector

    @property
    def layer_projectors(self) -> nn.ModuleList:
        return self.model.layer_projectors

    @property
    def family(self):
        return self.model.family

    # The caches live on `SaisaModel`, whose forward reads them; the full model reaches them under the same names.
    image_kv_cache = property(
        lambda self: self.model.image_kv_cache, lambda self, cache: setattr(self.model, "image_kv_cache", cache)
    )
    vision_feature_cache = property(
        lambda self: self.model.vision_feature_cache,
        lambda self, cache: setattr(self.model, "vision_feature_cache", cache),
    )

    @property
    def tokens_per_image(self) -> int:
        return self.model.tokens_per_image

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def get_image_features(self, pixel_values: torch.Tensor, layer: int | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, layer, **kwargs)

    # -- transformers plumbing -------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also in the key names saved folders use: transformers' Trainer resumes a checkpoint
        by passing its file's tensors here."""
        return super().load_state_dict(from_legacy_keys(state_dict), strict=strict, assign=assign)

    # GenerationMixin's private builder of the logits processors: the one place every decoding strategy takes them from
    def _get_logits_processor(self, *args, **kwargs):
        """`generate` never produces the image placeholder (where its id is in the vocabulary): a generated `<image>`
        would be an image without pixels. Prompt lookup screens its copies with these processors too."""
        processors = super()._get_logits_processor(*args, **kwargs)
        if 0 <= self.config.image_token_id < self.config.text_config.vocab_size:
            processors.append(partial(_forbid_token, lambda input_ids, scores: scores, self.config.image_token_id))
        return processors

    # GenerationMixin's private builder of assisted decoding's candidate generator: the only place to screen candidates
    def _get_candidate_generator(self, *args, **kwargs):
        """Candidate tokens (prompt lookup copies n-grams of the prompt, a draft model guesses) never include an image
        placeholder: a proposed `<image>` would be an image without pixels. Candidates stop before the first one."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        propose, image_id = generator.get_candidates, self.config.image_token_id
        screen = getattr(generator, "logits_processor", None)
        if screen is not None and image_id >= 0 and hasattr(generator, "vocab_size"):
            # Prompt lookup screens each copied token with the logits processors over `vocab_size` fake logits: make
            # room for a placeholder id past the vocabulary and forbid it there, so the copy stops before it.
            generator.vocab_size = max(generator.vocab_size, image_id + 1)
            generator.logits_processor = partial(_forbid_token, screen, image_id)

        def get_candidates(input_ids, *a, **k):
            candidates, logits = propose(input_ids, *a, **k)
            new = candidates[:, input_ids.shape[1] :]  # (B, n)
            image_columns = (new == image_id).any(0).nonzero()
            if image_columns.numel():
                keep = int(image_columns[0])
                candidates = candidates[:, : input_ids.shape[1] + keep]
                logits = logits[:, :keep] if logits is not None and keep else None
            return candidates, logits

        generator.get_candidates = get_candidates
        return generator

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SaisaCausalLMOutputWithPast | tuple:
        """`SaisaModel.forward`'s inputs, plus labels (B, T) for the next-token loss.

        num_items_in_batch: the number of label tokens in the whole optimizer step (all micro-batches, all ranks), as
        transformers' Trainer passes it; the loss is then the step's token mean however the step is split."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            labels_given=labels is not None,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state  # (B, T, h)
        ids = input_ids if input_ids is not None else torch.zeros(hidden.shape[:2], dtype=torch.long)
        ids = ids.to(hidden.device)
        length = ids.shape[1]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[:, -length:].to(hidden.device)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])  # (B, kept, vocab)
        if self.config.arch.visual_keys_values_only:
            # A visual token issues no query, so nothing predicts the token after an image: uniform logits.
            is_image = (ids == self.config.image_token_id) & mask.bool()
            logits = logits.masked_fill(is_image[:, keep, None].to(logits.device), 0.0)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is not None:
            # pre-shifted targets (column j: the token after j), as sequence parallelism hands them: back in place
            labels = F.pad(shift_labels[:, :-1], (1, 0), value=IGNORE_INDEX)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device), ids, mask, num_items_in_batch)
        output = SaisaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )
        return output if return_dict else output.to_tuple()

    def loss_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`saisa.model.modeling.loss_labels` for this model."""
        return loss_labels(
            input_ids,
            attention_mask,
            labels,
            image_token_id=self.config.image_token_id,
            architecture=self.config.architecture,
        )

    def _loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """Next-token cross-entropy in input_ids' layout, summed, over the step's label count (or this batch's)."""
        targets = self.loss_labels(input_ids, attention_mask, labels)[:, 1:]  # (B, T-1), target of column j is j+1
        total = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
        return total / torch.as_tensor(count, device=total.device).clamp(min=1)

    # -- generation ----------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        attention_mask=None,
        pixel_values=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        layout = getattr(kwargs.get(CACHE_KWARG), "layout", None)
        if layout is not None:
            # The cache also holds visual keys, so its length is not a count of input_ids columns; the layout is.
            # (A prompt given as inputs_embeds is in the cache but not in input_ids.)
            seen = layout.num_input_tokens - (inputs_embeds.shape[1] if inputs_embeds is not None else 0)
            input_ids, next_sequence_length = input_ids[:, seen:], None
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # generate derives position_ids from the attention mask, blind to each image taking v positions: the model
        # computes its own from the images' places
        inputs.pop("position_ids", None)
        new_ids = inputs.get("input_ids")
        if new_ids is None:  # the prompt as inputs_embeds (images found by their placeholder's embedding)
            inputs["pixel_values"] = pixel_values
            return inputs
        if self.config.arch.visual_keys_values_only and (new_ids[:, -1] == self.config.image_token_id).any():
            raise ValueError("in SAISA no token is predicted right after an image: put text after the last image")
        if (new_ids == self.config.image_token_id).any():
            inputs["pixel_values"] = pixel_values
        return inputs

    # GenerationMixin's private hook that repeats inputs for beams and num_return_sequences, per sample
    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ):
        """Beam search and `num_return_sequences` repeat every sample; pixel_values holds images, not samples, so each
        sample's images are repeated with it (transformers would repeat each image in place)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            per_sample = (input_ids == self.config.image_token_id).sum(1).tolist()  # (B,) images of each sample
            chunks = torch.split(pixel_values, per_sample)
            pixel_values = torch.cat([chunk for chunk in chunks for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the execution device of an accelerate hook (`device_map` with offloading leaves
    offloaded weights on `meta`), else the device of its weights."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for one in getattr(hook, "hooks", [hook]):
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return next(module.parameters()).device


def _check_position_ids(position_ids: torch.Tensor, seq: SequenceLayout) -> None:
    """Raises unless position_ids (B or 1, T) equal the layout's positions at every real text column."""
    expected, real = seq.text_positions, seq.text_attendable  # (B, T) each
    given = position_ids.to(expected.device)
    if given.ndim != 2 or given.shape[1] != expected.shape[1] or given.shape[0] not in (1, expected.shape[0]):
        raise ValueError(f"position_ids must be (batch, seq) = {tuple(expected.shape)}, got {tuple(given.shape)}")
    if not torch.equal(given.expand_as(expected)[real], expected[real]):
        raise ValueError(
            "position_ids differ from the positions the model computes (each image takes "
            f"{seq.tokens_per_image} positions, padding none, counting on from the cache): leave position_ids out"
        )


def _forbid_token(processor, token: int, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`processor`'s scores (B, V), with `token` forbidden."""
    return processor(input_ids, scores).index_fill(-1, torch.tensor([token], device=scores.device), -float("inf"))


def _input_rows(seq: SequenceLayout, x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with (visual block, input columns) = Vb + T rows along `dim` -> the T input columns' rows, a placeholder
    taking its image's last visual token's row (what the next text token is predicted from)."""
    block = seq.block_size
    x = x.movedim(dim, 1)  # (B, Vb + T, ...)
    visual, text = x[:, :block], x[:, block:]
    if block:
        trailing = (1,) * (x.ndim - 2)
        slots = seq.last_slot_of_placeholder.view(*seq.last_slot_of_placeholder.shape, *trailing)
        last = visual.gather(1, slots.expand(-1, -1, *x.shape[2:]))
        text = torch.where(seq.is_image.view(*seq.is_image.shape, *trailing), last, text)
    return text.movedim(1, dim)
