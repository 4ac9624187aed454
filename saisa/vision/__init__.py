"""Vision encoders: a registry keyed by the vision config's `model_type`; adding one is one small file.

Every encoder maps pixel values `(N, 3, S, S)` to patch features `(N, v, d_vis)` and states its preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images are prepared for an encoder: LLaVA-1.5 pads to square (with the mean colour, `SaisaProcessor`),
    then `image_processor_type` resizes to `image_size` and normalises."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_processor_type: str = "SaisaImageProcessor"  # or CLIPImageProcessor / SiglipImageProcessor

    def image_processor(self) -> BaseImageProcessor:
        # The PIL backends: bit-identical to LLaVA-1.5's PIL preprocessing, and no torchvision needed.
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

        from saisa.vision.image_processing import SaisaImageProcessor

        side = self.image_size
        square = {"height": side, "width": side}
        stats = {"image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        if self.image_processor_type == "CLIPImageProcessor":
            return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=square, **stats)
        if self.image_processor_type == "SiglipImageProcessor":
            return SiglipImageProcessorPil(size=square, **stats)
        if self.image_processor_type == "SaisaImageProcessor":
            return SaisaImageProcessor(size=square, **stats)
        raise ValueError(f"unknown image processor {self.image_processor_type!r}")

    @classmethod
    def of(cls, image_processor: BaseImageProcessor) -> ImagePreprocessing:
        """What an image processor does to an (already square) image."""
        size = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
        return cls(
            size.height or size.shortest_edge,
            tuple(image_processor.image_mean),
            tuple(image_processor.image_std),
            type(image_processor).__name__.removesuffix("Pil"),
        )


class VisionEncoder(PreTrainedModel):
    """Base class, a `PreTrainedModel` (as transformers' vision towers are) holding the encoder as `self.model`.
    Subclasses call `super().__init__(config)`, set `self.hidden_size` (d_vis) and `self.num_tokens` (v) and implement
    `forward`."""

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


def build_vision_encoder(
    config: PreTrainedConfig, *, feature_layer: int, select_strategy: str, module: nn.Module | None = None
) -> VisionEncoder:
    """Build the encoder for `config` (random weights), or wrap an already-loaded `module` of that kind."""
    try:
        cls = VISION_ENCODERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"unsupported vision encoder {config.model_type!r}; supported: {sorted(VISION_ENCODERS)} "
            "(add one with saisa.vision.register_vision_encoder)"
        ) from None
    return cls(config, feature_layer=feature_layer, select_strategy=select_strategy, module=module)


from saisa.vision import clip, efficientnet  # noqa: E402,F401  (registers the built-in encoders)
