"""vLLM's multimodal processing for our checkpoints: images and videos through `SaisaProcessor` (LLaVA-1.5's pad to
square and the encoder's own image processor, as in training; AnyRes tiles when the checkpoint's processor has
`image_grid_pinpoints`; a video's uniformly sampled frames), each `<image>` or `<video>` in the prompt expanded to
views x v image placeholder tokens (`saisa.processing.views`: an image's base view and tiles, a video's frames).

The placeholders take ordinary KV-cache slots and positions: a view occupies v consecutive positions, as in our
model, and vLLM's scheduler, chunked prefill and prefix caching treat them as tokens.

Every prompt is checked here, in the API server, before it reaches the engine, where a bad token id would stop the
engine for every user: one `<image>` per image and one `<video>` per video, no image-token id outside an image's
placeholders (the `<image>` id is outside the LLM's vocabulary), every other id inside it, no image or video at the
end (`check_prompt`). vLLM sends a prompt without images straight to the engine, past any multimodal processor, so the
processor also installs a check of those (`_check_prompts_without_images`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, cached_property, partial, wraps

import torch
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.inputs import MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)

from saisa.components.encoders import VisionEncoder, build_vision_encoder
from saisa.model.configuration import SaisaConfig
from saisa.processing import IMAGE_TOKEN, SaisaProcessor
from saisa.processing.views import NUM_FRAMES


def vision_encoder(config: SaisaConfig) -> VisionEncoder:
    """The checkpoint's vision encoder (random weights; on the meta device for its shape only)."""
    return build_vision_encoder(
        config.vision_config,
        feature_layer=config.vision_feature_layer,
        select_strategy=config.vision_feature_select_strategy,
    )


class SaisaProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> SaisaConfig:
        return self.ctx.get_hf_config(SaisaConfig)

    def get_hf_processor(self, **kwargs: object) -> SaisaProcessor:
        return self.ctx.get_hf_processor(SaisaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # a video's placeholder is matched by its one token id: a tokenizer without it takes no video
        return {"image": None, "video": None if self.video_token_id is not None else 0}

    @cached_property
    def video_token_id(self) -> int | None:
        """The processor's video placeholder's id where the tokenizer has it as one token (LLaVA-NeXT-Video's and
        OneVision's do; add it with `tokenizer.add_tokens(["<video>"], special_tokens=True)` and save), else None."""
        ids = self.get_tokenizer().encode(self.get_hf_processor().video_token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    @cached_property
    def _encoder_shape(self) -> tuple[int, int]:  # (v tokens per image, image side in pixels)
        with torch.device("meta"):
            encoder = vision_encoder(self.get_hf_config())
        return encoder.num_tokens, encoder.preprocessing.image_size

    @property
    def tokens_per_image(self) -> int:
        return self._encoder_shape[0]

    @property
    def image_size(self) -> int:
        return self._encoder_shape[1]

    @cached_property
    def max_image_views(self) -> int:
        """An image's most views: its base view and the largest grid's tiles (one view untiled)."""
        return self.get_hf_processor().max_views(num_frames=1)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.max_image_views * self.tokens_per_image, "video": NUM_FRAMES * self.tokens_per_image}


class SaisaDummyInputsBuilder(BaseDummyInputsBuilder[SaisaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # a token after the images: SAISA refuses a prompt that ends with an image (the profiling prompt included)
        placeholders = IMAGE_TOKEN * mm_counts.get("image", 0)
        placeholders += self.info.get_hf_processor().video_token * mm_counts.get("video", 0)
        return placeholders + (self.info.get_tokenizer().eos_token or ".")

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        side = self.info.image_size
        # the largest grid's own size: the image tiled on it, the most views
        height, width = max(
            self.info.get_hf_processor().image_grid_pinpoints or [[side, side]], key=lambda p: p[0] * p[1]
        )
        options = mm_options or {}
        return {
            "image": self._get_dummy_images(
                width=width, height=height, num_images=mm_counts.get("image", 0), overrides=options.get("image")
            ),
            "video": self._get_dummy_videos(
                width=side,
                height=side,
                num_frames=NUM_FRAMES,
                num_videos=mm_counts.get("video", 0),
                overrides=options.get("video"),
            ),
        }


class SaisaMultiModalProcessor(BaseMultiModalProcessor[SaisaProcessingInfo]):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        _check_prompts_without_images()

    # vLLM's (underscored) extension point: the processor on the images and videos alone (the prompt is tokenised)
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Each image's views and each video's frames, with their counts: one call per item, so the counts are the
        processor's own."""
        processor = self.info.get_hf_processor(**hf_kwargs)
        out = {}
        for kind, pixels, counts in (
            ("images", "pixel_values", "image_num_views"),
            ("videos", "pixel_values_videos", "video_num_frames"),
        ):
            items = [
                self.info.ctx.call_hf_processor(processor, {kind: [item]}, hf_kwargs)["pixel_values"]
                for item in hf_data.get(kind) or []
            ]  # each (views, 3, S, S)
            if items:
                out[pixels] = torch.cat([torch.as_tensor(item) for item in items])  # (all views, 3, S, S)
                out[counts] = torch.tensor([len(item) for item in items])
        return BatchFeature(out)

    # vLLM's (underscored) extension point: how the processor's outputs split into per-item parts
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        none = torch.zeros(0, dtype=torch.long)
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", hf_inputs.get("image_num_views", none)),
            "image_num_views": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "pixel_values_videos": MultiModalFieldConfig.flat_from_sizes(
                "video", hf_inputs.get("video_num_frames", none)
            ),
            "video_num_frames": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    # vLLM's (underscored) extension point: how each `<image>` / `<video>` expands into its placeholder tokens
    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        v = self.info.tokens_per_image

        def placeholders(item: int, modality: str, counts: str) -> list[int]:
            return [image_token_id] * (int(out_mm_kwargs[modality][item][counts].data) * v)

        updates = [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=partial(placeholders, modality="image", counts="image_num_views"),
            )
        ]
        if self.info.video_token_id is not None:  # else no video is taken (`get_supported_mm_limits`)
            updates.append(
                PromptReplacement(
                    modality="video",
                    target=[self.info.video_token_id],
                    replacement=partial(placeholders, modality="video", counts="video_num_frames"),
                )
            )
        return updates

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        if not isinstance(inputs.prompt, str):  # token ids: every request's prompt (vLLM tokenises first)
            # before vLLM's processing, which records the images as sent to the engine in its multimodal cache
            counts = inputs.mm_data_items
            self.check_prompt(
                inputs.prompt, counts.get_count("image", strict=False), counts.get_count("video", strict=False)
            )
        return super().apply(inputs, timing_ctx)

    def check_prompt(self, prompt: Sequence[int], images: int = 0, videos: int = 0) -> None:
        """Raises `SaisaPromptError` (a 400 from vLLM's server) unless the prompt has one `<image>` per image and one
        `<video>` per video, every other id is in the LLM's vocabulary, and it does not end with an image or video. A
        token prompt with an image's placeholders already expanded is refused too: vLLM 0.32 would expand each of
        them again."""
        config = self.info.get_hf_config()
        vocab, image_token_id = config.text_config.vocab_size, config.image_token_id
        is_image = [token == image_token_id for token in prompt]
        found = sum(is_image)
        if found != images:
            raise SaisaPromptError(
                f"the prompt has {found} {IMAGE_TOKEN} token(s) for {images} image(s): put exactly one "
                f"{IMAGE_TOKEN} where each image goes, and send one image per placeholder"
            )
        video_token, video_id = self.info.get_hf_processor().video_token, self.info.video_token_id
        found = sum(token == video_id for token in prompt) if video_id is not None else 0
        if found != videos:
            raise SaisaPromptError(
                f"the prompt has {found} {video_token} placeholder(s) for {videos} video(s): put exactly one "
                f"{video_token} where each video goes, and send one video per placeholder"
            )
        for position, token in enumerate(prompt):
            if not (is_image[position] or token == video_id) and not 0 <= token < vocab:
                raise SaisaPromptError(
                    f"token id {token} at position {position} is outside the language model's vocabulary "
                    f"(0 to {vocab - 1})"
                )
        if config.arch.visual_keys_values_only and prompt and (is_image[-1] or (videos and prompt[-1] == video_id)):
            # Visual tokens issue no queries in SAISA: nothing would predict the first generated token.
            raise SaisaPromptError(
                "SAISA cannot continue a prompt that ends with an image or video (no query predicts the token after "
                "it): put text after the last one, e.g. the chat template's generation prompt"
            )


class SaisaPromptError(VLLMValidationError, ValueError):
    """A prompt our model cannot run: vLLM's server answers 400 with the message; `LLM.generate` raises it."""


@cache
def _check_prompts_without_images() -> None:
    """vLLM's API server hands a prompt without images to the engine without calling the model's multimodal
    processor, so an `<image>` typed into a text-only prompt would reach the embedding as an id past the vocabulary
    and stop the engine. This wraps the frontend's per-request input check (`InputProcessor._validate_model_input`,
    run for every request, server and `LLM` alike) so that, for our models only, those prompts get `check_prompt`."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_model_input

    @wraps(original)
    def validate(self, prompt_input, prompt_type):
        original(self, prompt_input, prompt_type)
        processor = getattr(getattr(self, "renderer", None), "mm_processor", None)
        if isinstance(processor, SaisaMultiModalProcessor) and prompt_input["type"] == "token":
            processor.check_prompt(prompt_input["prompt_token_ids"])

    InputProcessor._validate_model_input = validate
