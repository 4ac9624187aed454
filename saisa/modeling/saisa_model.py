"""`SaisaForConditionalGeneration`: SAISA, LLaVA-1.5 and NAAViT over an unmodified transformers decoder LLM.

Reading guide (SAISA.md §3):
- per-layer projection ........ `project_visual_features` (one MLP per layer, or one shared)
- visual K/V .................. `saisa.modeling.visual_prefix` (per layer: projector, the layer's norm and K/V
                                projections via `saisa.backbones.DecoderFamily`, RoPE at the images' positions)
- positions and the mask ...... `saisa.modeling.layout`
- LLaVA / NAAViT baselines .... `_forward_embedding_space` (visual tokens spliced into the input embeddings)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from saisa.backbones import decoder_family
from saisa.compat import CACHE_KWARG
from saisa.configuration_saisa import SaisaConfig
from saisa.modeling.attention import VISUAL_KV_KWARG, saisa_attention_name
from saisa.modeling.cache import SaisaCache
from saisa.modeling.image_kv_cache import ImageKVCache
from saisa.modeling.layout import KeyLayout, SequenceLayout, attention_mask_4d, sequence_layout
from saisa.modeling.projector import MLPProjector
from saisa.modeling.visual_prefix import VisualPrefix
from saisa.vision import build_vision_encoder
from saisa.vision.feature_cache import VisionFeatureCache

IGNORE_INDEX = -100


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
    if architecture == "saisa":
        ignore[:, 1:] |= is_image[:, :-1]
    return labels.masked_fill(ignore, IGNORE_INDEX)


class SaisaPreTrainedModel(PreTrainedModel):
    config_class = SaisaConfig
    config: SaisaConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    accepts_loss_kwargs = True  # forward normalises by `num_items_in_batch` (transformers' Trainer contract)
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only the projectors are ours; the LLM and the vision encoder initialise themselves.
        if isinstance(module, MLPProjector):
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)


class SaisaForConditionalGeneration(SaisaPreTrainedModel, GenerationMixin):
    def __init__(
        self,
        config: SaisaConfig,
        *,
        language_model: PreTrainedModel | None = None,
        vision_model: nn.Module | None = None,
    ):
        super().__init__(config)
        self.family = decoder_family(config.text_config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = build_vision_encoder(
            config.vision_config,
            feature_layer=config.vision_feature_layer,
            select_strategy=config.vision_feature_select_strategy,
            module=vision_model,
        )
        vision_dim, text_dim = self.vision_tower.hidden_size, config.text_config.hidden_size
        projector = lambda: MLPProjector(  # noqa: E731
            vision_dim, text_dim, act=config.projector_hidden_act, bias=config.projector_bias
        )
        if config.architecture == "saisa" and not config.shared_projector:
            self.layer_projectors = nn.ModuleList(projector() for _ in range(config.text_config.num_hidden_layers))
        else:
            self.projector = projector()
        # Optional, inference only: per-image visual K/V reused across requests (`saisa.modeling.image_kv_cache`).
        self.image_kv_cache: ImageKVCache | None = None
        # Optional: a frozen encoder's features kept on disk across runs (`saisa.vision.feature_cache`).
        self.vision_feature_cache: VisionFeatureCache | None = None
        inner = self.language_model.config._attn_implementation or "sdpa"
        self.language_model.set_attn_implementation(saisa_attention_name(inner.removeprefix("saisa_")))
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Our folders load as usual; LLaVA-1.5, llava-hf and the authors' SAISA releases are converted on load."""
        from saisa.interop import detect_layout, load_foreign

        folder = Path(str(pretrained_model_name_or_path))
        if (folder / "config.json").exists() and detect_layout(folder) != "saisa":
            print(
                f"{folder}: {detect_layout(folder)} checkpoint converted on load "
                "(`saisa convert` writes the converted folder once)"
            )
            return load_foreign(folder, architecture=kwargs.pop("architecture", None), dtype=kwargs.get("dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_modules(cls, language_model: PreTrainedModel, vision_model: nn.Module, **config_kwargs):
        """Build around an already-loaded LLM and vision encoder (their weights are kept; projectors are new)."""
        vision_config = config_kwargs.pop("vision_config", None) or vision_model.config
        config = SaisaConfig(text_config=language_model.config, vision_config=vision_config, **config_kwargs)
        return cls(config, language_model=language_model, vision_model=vision_model)

    # -- transformers plumbing -------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.vision_tower.parameters()):
            self.vision_tower.eval()  # a frozen encoder keeps its batch-norm statistics and no dropout
        return self

    @property
    def tokens_per_image(self) -> int:
        return self.vision_tower.num_tokens

    # -- SAISA.md §3 -------------------------------------------------------------------------------------------------
    def project_visual_features(self, features: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(N, v, d_vis) -> (N, v, h): into layer `layer`'s input space (SAISA) or the embedding space (LLaVA)."""
        if layer is not None and hasattr(self, "layer_projectors"):
            return self.layer_projectors[layer](features)
        return self.projector(features)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, v, d_vis) patch features, on the vision encoder's device and in its dtype."""
        self._check_pixel_values(pixel_values)
        weight = next(self.vision_tower.parameters())
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        if self.vision_feature_cache is not None:
            return self.vision_feature_cache.encode(self.vision_tower, pixel_values)
        return self.vision_tower(pixel_values)

    def _phantom_image(self) -> torch.Tensor | None:
        """In training, a batch without images still runs one blank image through every visual weight, with no
        visual tokens (`SequenceLayout.scatter_images` keeps zero of its slots): every rank then calls the same
        modules in the same order and gets a (zero) gradient for each, as ZeRO-3's gathers and FSDP's reductions
        need when another rank's batch holds images (as LLaVA's own training does). None outside training."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        size = self.vision_tower.preprocessing.image_size
        return torch.zeros(1, 3, size, size)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.vision_tower.preprocessing.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values must have shape (num_images, 3, {size}, {size}) for this vision encoder, got "
                f"{tuple(pixel_values.shape)}; prepare images with SaisaProcessor"
            )

    # -- forward -------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,  # ignored: positions follow from the images' places
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) with `image_token_id` once per image; pixel_values (N, 3, S, S), every image of the batch
        in order; attention_mask (B, T) or (B, cached + T) for the new tokens (1 = real, 0 = padding).

        num_items_in_batch: the number of label tokens in the whole optimizer step (all micro-batches, all ranks), as
        transformers' Trainer passes it; the loss is then the step's token mean however the step is split."""
        cache = self._saisa_cache(cache if cache is not None else past_key_values)
        if use_cache is None:
            # a loss evaluation keeps no cache: nothing reuses it, and each layer then makes its own visual K/V inside
            # its forward (where FSDP/ZeRO-3 have gathered it), as in training
            use_cache = cache is not None or (
                not self.training and labels is None and self.config.text_config.use_cache
            )
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -length:]

        prior = self._cached_layout(cache, batch, input_ids.device)
        seq = sequence_layout(
            input_ids,
            attention_mask,
            image_token_id=self.config.image_token_id,
            tokens_per_image=self.tokens_per_image,
            start_positions=prior.next_position,
        )
        self._check_inputs(input_ids, seq, pixel_values)
        if use_cache and cache is None:
            cache = SaisaCache(config=self.config.text_config)

        layout_after = prior.extend(seq)  # kept on the inputs' device, where the next call's layout is computed
        # The layout is computed where input_ids are; the modules get everything on their own device.
        device = self.get_input_embeddings().weight.device
        seq, keys = seq.to(device), layout_after.to(device)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

        text_ids = input_ids.masked_fill(seq.is_image, 0)  # the placeholder id need not be in the vocabulary
        text_embeds = self.get_input_embeddings()(text_ids)  # (B, T, h)
        images = pixel_values if seq.num_images else self._phantom_image()
        entries_before = cache.entries() if cache is not None else None
        try:
            if images is None and prior.positions.shape[1] == 0:
                # Text only, nothing cached: exactly the bare LLM.
                hidden = self._decoder(text_embeds, attention_mask, seq.text_positions, cache, use_cache)
            elif self.config.architecture == "saisa":
                prefix = VisualPrefix(self, images, seq) if images is not None else None
                hidden = self._forward_saisa(seq, keys, prior, prefix, text_embeds, cache, use_cache)
            else:
                features = self.encode_images(images) if images is not None else None
                hidden = self._forward_embedding_space(seq, keys, prior, features, text_embeds, cache, use_cache)
        except BaseException:
            if cache is not None:  # a failed call leaves the cache as it found it, in step with its layout
                cache.truncate(entries_before)
            raise
        if cache is not None:
            cache.layout = layout_after
        if logits_to_keep:
            hidden, is_image = hidden[:, -logits_to_keep:], seq.is_image[:, -logits_to_keep:]
        else:
            is_image = seq.is_image
        logits = self.language_model.get_output_embeddings()(hidden)  # (B, T, vocab)
        if self.config.architecture == "saisa":
            # A visual token issues no query, so nothing predicts the token after an image: uniform logits.
            logits = logits.masked_fill(is_image[..., None], 0.0)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device), input_ids, attention_mask, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: cache if use_cache else None})

    def _forward_saisa(
        self,
        seq: SequenceLayout,
        keys: KeyLayout,
        prior: KeyLayout,
        prefix: VisualPrefix | None,
        text_embeds,
        cache,
        use_cache,
    ) -> torch.Tensor:
        """Text runs through the unchanged LLM; each layer's key/value set gains that layer's visual K/V."""
        mask = attention_mask_4d(
            query_positions=seq.text_positions,
            query_is_visual=torch.zeros_like(seq.is_image),
            keys=keys,
            first_query_key=prior.positions.shape[1] + seq.block_size,
            no_visual_to_visual=False,
            dtype=text_embeds.dtype,
        )
        extra = {}
        if prefix is not None and use_cache:  # a KV prefix: the cache holds every layer's visual K/V before the text
            for layer_idx in range(len(self.family.layers(self.language_model))):
                cache.update(*prefix.layer(layer_idx), layer_idx)
        elif prefix is not None:  # each layer asks for its own, inside its forward (saisa.modeling.attention)
            extra[VISUAL_KV_KWARG] = prefix.layer
        return self._decoder(text_embeds, mask, seq.text_positions, cache, use_cache, **extra)

    def _forward_embedding_space(
        self, seq: SequenceLayout, keys: KeyLayout, prior: KeyLayout, features, text_embeds, cache, use_cache
    ) -> torch.Tensor:
        """LLaVA-1.5 / NAAViT: projected visual tokens join the input sequence as full tokens."""
        batch, block, width = text_embeds.shape[0], seq.block_size, text_embeds.shape[-1]
        visual_embeds = (
            seq.scatter_images(self.project_visual_features(features))
            if features is not None
            else text_embeds.new_zeros(batch, 0, width)
        )  # (B, Vb, h)
        positions = torch.cat([seq.visual_positions, seq.text_positions], 1)
        is_visual = torch.cat([seq.visual_valid, torch.zeros_like(seq.is_image)], 1)
        mask = attention_mask_4d(
            query_positions=positions,
            query_is_visual=is_visual,
            keys=keys,
            first_query_key=prior.positions.shape[1],
            no_visual_to_visual=self.config.architecture == "naavit",
            dtype=text_embeds.dtype,
        )
        hidden = self._decoder(torch.cat([visual_embeds, text_embeds], 1), mask, positions, cache, use_cache)
        # A placeholder predicts what its image's last visual token predicts (the next text token).
        visual_hidden, text_hidden = hidden[:, :block], hidden[:, block:]
        if block:
            last = visual_hidden.gather(1, seq.last_slot_of_placeholder[..., None].expand(-1, -1, width))
            text_hidden = torch.where(seq.is_image[..., None], last, text_hidden)
        return text_hidden

    def _decoder(self, embeds, mask, positions, cache, use_cache, **extra) -> torch.Tensor:
        decoder = self.family.decoder(self.language_model)
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **{CACHE_KWARG: cache if use_cache else None},
            **extra,
        )
        return out.last_hidden_state

    def loss_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`saisa.modeling.saisa_model.loss_labels` for this model."""
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

    def _check_inputs(self, input_ids: torch.Tensor, seq: SequenceLayout, pixel_values: torch.Tensor | None) -> None:
        given = 0 if pixel_values is None else pixel_values.shape[0]
        if given != seq.num_images:
            raise ValueError(
                f"input_ids hold {seq.num_images} image placeholder(s) (id {self.config.image_token_id}) but "
                f"pixel_values holds {given} image(s); give exactly one image per placeholder, in order"
            )
        text = input_ids[seq.text_attendable]
        vocab = self.config.text_config.vocab_size
        if text.numel() and (text.min() < 0 or text.max() >= vocab):
            raise ValueError(f"input_ids contain ids outside the LLM's vocabulary [0, {vocab})")
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        longest = int(seq.next_position.max()) if seq.next_position.numel() else 0
        if limit is not None and longest > limit:
            raise ValueError(
                f"sequence too long: {longest} positions (each image takes {self.tokens_per_image}) exceed the "
                f"LLM's maximum of {limit}"
            )

    # -- generation ----------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        attention_mask=None,
        pixel_values=None,
        is_first_iteration=False,
        **kwargs,
    ):
        layout = getattr(kwargs.get(CACHE_KWARG), "layout", None)
        if layout is not None:
            # The cache also holds visual keys, so its length is not a count of input_ids columns; the layout is.
            input_ids, next_sequence_length = input_ids[:, layout.num_input_tokens :], None
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        new_ids = inputs["input_ids"]
        if self.config.architecture == "saisa" and (new_ids[:, -1] == self.config.image_token_id).any():
            raise ValueError("in SAISA no token is predicted right after an image: put text after the last image")
        if (new_ids == self.config.image_token_id).any():
            inputs["pixel_values"] = pixel_values
        return inputs

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
