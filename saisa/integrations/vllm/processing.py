"""vLLM's multimodal processing for our checkpoints: images through `SaisaProcessor` (LLaVA-1.5's pad to square and
the encoder's own image processor, as in training), each `<image>` in the prompt expanded to v placeholder tokens.

The placeholders take ordinary KV-cache slots and positions: an image occupies v consecutive positions, as in our
model, and vLLM's scheduler, chunked prefill and prefix caching treat them as tokens.

Every prompt is checked here, in the API server, before it reaches the engine, where a bad token id would stop the
engine for every user: one `<image>` per image, no image-token id outside an image's placeholders (the `<image>` id is
outside the LLM's vocabulary), every other id inside it, no image at the end (`check_prompt`). vLLM sends a prompt
without images straight to the engine, past any multimodal processor, so the processor also installs a check of those
(`_check_prompts_without_images`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache, cached_property, wraps

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

from saisa.configuration_saisa import SaisaConfig
from saisa.processing import IMAGE_TOKEN, SaisaProcessor
from saisa.vision import VisionEncoder, build_vision_encoder


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
        return {"image": None}

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

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.tokens_per_image}


class SaisaDummyInputsBuilder(BaseDummyInputsBuilder[SaisaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # a token after the images: SAISA refuses a prompt that ends with an image (the profiling prompt included)
        return IMAGE_TOKEN * mm_counts.get("image", 0) + (self.info.get_tokenizer().eos_token or ".")

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        side = self.info.image_size
        overrides = (mm_options or {}).get("image")
        return {
            "image": self._get_dummy_images(
                width=side, height=side, num_images=mm_counts.get("image", 0), overrides=overrides
            )
        }


class SaisaMultiModalProcessor(BaseMultiModalProcessor[SaisaProcessingInfo]):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        _check_prompts_without_images()

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}  # (N, 3, S, S): one row per image

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        return [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=[image_token_id] * self.info.tokens_per_image,
            )
        ]

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        if not isinstance(inputs.prompt, str):  # token ids: every request's prompt (vLLM tokenises first)
            # before vLLM's processing, which records the images as sent to the engine in its multimodal cache
            self.check_prompt(inputs.prompt, inputs.mm_data_items.get_count("image", strict=False))
        return super().apply(inputs, timing_ctx)

    def check_prompt(self, prompt: Sequence[int], images: int = 0) -> None:
        """Raises `SaisaPromptError` (a 400 from vLLM's server) unless the prompt has one `<image>` per image, every
        other id is in the LLM's vocabulary, and it does not end with an image. A token prompt with an image's v
        placeholders already expanded is refused too: vLLM 0.32 would expand each of them again."""
        config = self.info.get_hf_config()
        vocab, image_token_id = config.text_config.vocab_size, config.image_token_id
        is_image = [token == image_token_id for token in prompt]
        found = sum(is_image)
        if found != images:
            raise SaisaPromptError(
                f"the prompt has {found} {IMAGE_TOKEN} token(s) for {images} image(s): put exactly one "
                f"{IMAGE_TOKEN} where each image goes, and send one image per placeholder"
            )
        for position, token in enumerate(prompt):
            if not is_image[position] and not 0 <= token < vocab:
                raise SaisaPromptError(
                    f"token id {token} at position {position} is outside the language model's vocabulary "
                    f"(0 to {vocab - 1})"
                )
        if config.architecture == "saisa" and found and is_image[-1]:
            # Visual tokens issue no queries in SAISA: nothing would predict the first generated token.
            raise SaisaPromptError(
                "SAISA cannot continue a prompt that ends with an image (no query predicts the token after it): "
                "put text after the last <image>, e.g. the chat template's generation prompt"
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
