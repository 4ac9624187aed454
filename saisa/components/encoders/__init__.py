"""Vision encoders, one file each: every module in this folder is imported here and registers its encoder class with
`register_vision_encoder`, and the image processor its preprocessing names with `register_image_processor`
(saisa.components.encoders.base). An encoder outside saisa registers the same way."""

import importlib
import pkgutil

from saisa.components.encoders.base import (
    IMAGE_PROCESSORS,
    VISION_ENCODERS,
    ImagePreprocessing,
    VisionEncoder,
    build_vision_encoder,
    register_image_processor,
    register_vision_encoder,
    visual_token_count,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "IMAGE_PROCESSORS",
    "VISION_ENCODERS",
    "ImagePreprocessing",
    "VisionEncoder",
    "build_vision_encoder",
    "register_image_processor",
    "register_vision_encoder",
    "visual_token_count",
]
