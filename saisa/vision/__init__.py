"""Vision encoders: a registry keyed by the vision config's `model_type`; adding one is one small file.

Every encoder maps pixel values `(N, 3, S, S)` to patch features `(N, v, d_vis)` and states its preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images are prepared for an encoder: LLaVA-1.5 pads to square (with the mean colour), then resizes."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


class VisionEncoder(nn.Module):
    """Base class. Subclasses set `self.hidden_size` (d_vis) and `self.num_tokens` (v) and implement `forward`."""

    hidden_size: int
    num_tokens: int
    preprocessing: ImagePreprocessing

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, v, d_vis)
        raise NotImplementedError


VISION_ENCODERS: dict[str, type[VisionEncoder]] = {}


def register_vision_encoder(*model_types: str):
    def decorator(cls: type[VisionEncoder]) -> type[VisionEncoder]:
        for model_type in model_types:
            VISION_ENCODERS[model_type] = cls
        return cls

    return decorator


def build_vision_encoder(config: PreTrainedConfig, *, feature_layer: int, select_strategy: str,
                         module: nn.Module | None = None) -> VisionEncoder:
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
