"""Vision encoders: a registry keyed by the vision config's `model_type`; adding one is one small file.

Every encoder maps pixel values `(N, 3, S, S)` to patch features `(N, v, d_vis)`, states its preprocessing (and
registers the image processor that names, where it is not one already registered), and declares what device_map and
FSDP must not split across devices (`_no_split_modules`, gathered into the SAISA model's by transformers' `post_init`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images are prepared for an encoder: LLaVA-1.5 pads to square (with the mean colour, `SaisaProcessor`),
    then the image processor named `image_processor_type` (as transformers names it in preprocessor_config.json; one
    registered with `register_image_processor`) resizes to `image_size` and normalises."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_processor_type: str = "SaisaImageProcessor"

    def image_processor(self) -> BaseImageProcessor:
        try:
            recipe = IMAGE_PROCESSORS[self.image_processor_type]
        except KeyError:
            raise ValueError(
                f"unknown image processor {self.image_processor_type!r}; registered: {sorted(IMAGE_PROCESSORS)} "
                "(add one with saisa.components.encoders.register_image_processor)"
            ) from None
        return recipe(self)

    def square_settings(self) -> dict:
        """An image processor's settings that resize straight to `image_size` squared and normalise with these stats."""
        side = self.image_size
        return {
            "size": {"height": side, "width": side},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def of(cls, image_processor: BaseImageProcessor) -> ImagePreprocessing:
        """What an image processor does to an (already square) image."""
        size = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
        return cls(
            size.height or size.shortest_edge,
            tuple(image_processor.image_mean),
            tuple(image_processor.image_std),
            # the name transformers saves, the same for a class's PIL and torchvision backends
            image_processor.to_dict()["image_processor_type"],
        )


# image_processor_type -> the image processor an `ImagePreprocessing` naming it stands for. Recipes build the PIL
# backend: bit-identical to LLaVA-1.5's PIL preprocessing, and no torchvision needed.
IMAGE_PROCESSORS: dict[str, Callable[[ImagePreprocessing], BaseImageProcessor]] = {}


def register_image_processor(image_processor_type: str):
    """Decorator for `recipe(preprocessing) -> image processor`: the processor `image_processor_type` names, set to
    `preprocessing`'s size, mean and std. An encoder's file registers the one its `preprocessing` names."""

    def decorator(recipe: Callable[[ImagePreprocessing], BaseImageProcessor]):
        IMAGE_PROCESSORS[image_processor_type] = recipe
        return recipe

    return decorator


class VisionEncoder(PreTrainedModel):
    """Base class, a `PreTrainedModel` (as transformers' vision towers are) holding the encoder as `self.model`.
    Subclasses call `super().__init__(config)`, set `self.hidden_size` (d_vis), `self.num_tokens` (v, from their
    `token_count`) and `self.preprocessing`, declare `_no_split_modules` and implement `token_count` and `forward`."""

    config_class = PreTrainedConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # The attention choice reaches the wrapped transformers encoder through its own config (a CNN has none to make).
    _supports_sdpa = True
    _supports_attention_backend = True
    hidden_size: int
    num_tokens: int
    preprocessing: ImagePreprocessing

    @classmethod
    def token_count(cls, config: PreTrainedConfig, select_strategy: str) -> int:
        """v, the features an image gives, read from the config alone (FLOPs accounting needs it without a model)."""
        raise NotImplementedError

    def _init_weights(self, module: nn.Module) -> None:
        """The wrapped encoder initialises itself (a transformers model) or arrives built (a CNN)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, v, d_vis)
        raise NotImplementedError

    def encode(
        self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutputWithPooling:
        """`forward`'s features as `last_hidden_state`, plus the encoder's own hidden states and attentions where it
        has them (a transformers encoder) and they are asked for."""
        return BaseModelOutputWithPooling(last_hidden_state=self(pixel_values))


VISION_ENCODERS: dict[str, type[VisionEncoder]] = {}


def register_vision_encoder(*model_types: str):
    def decorator(cls: type[VisionEncoder]) -> type[VisionEncoder]:
        for model_type in model_types:
            VISION_ENCODERS[model_type] = cls
        return cls

    return decorator


def _encoder_class(config: PreTrainedConfig) -> type[VisionEncoder]:
    try:
        return VISION_ENCODERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"unsupported vision encoder {config.model_type!r}; supported: {sorted(VISION_ENCODERS)} "
            "(add one with saisa.components.encoders.register_vision_encoder)"
        ) from None


def visual_token_count(config: PreTrainedConfig, select_strategy: str) -> int:
    """v for a vision config, without building the encoder."""
    return _encoder_class(config).token_count(config, select_strategy)


def build_vision_encoder(
    config: PreTrainedConfig, *, feature_layer: int, select_strategy: str, module: nn.Module | None = None
) -> VisionEncoder:
    """Build the encoder for `config` (random weights), or wrap an already-loaded `module` of that kind."""
    return _encoder_class(config)(config, feature_layer=feature_layer, select_strategy=select_strategy, module=module)
