"""vLLM's multimodal processing for our checkpoints: images through `SaisaProcessor` (LLaVA-1.5's pad to square and
the encoder's own image processor, as in training), each `<image>` in the prompt expanded to v placeholder tokens.

The placeholders take ordinary KV-cache slots and positions: an image occupies v consecutive positions, as in our
model, and vLLM's scheduler, chunked prefill and prefix caching treat them as tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
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

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        config = self.info.get_hf_config()
        if config.architecture == "saisa" and prompt and prompt[-1] == config.image_token_id:
            # Visual tokens issue no queries in SAISA: nothing would predict the first generated token.
            raise ValueError(
                "SAISA cannot continue a prompt that ends with an image (no query predicts the token after it): "
                "put text after the last <image>, e.g. the chat template's generation prompt"
            )
        return prompt
