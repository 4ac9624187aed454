"""Text and images to model inputs: the transformers processor, image opening and padding, conversation templates."""

from saisa.processing.images import ImageRefused, expand_to_square, open_image
from saisa.processing.processor import IMAGE_TOKEN, SaisaProcessor

__all__ = ["IMAGE_TOKEN", "ImageRefused", "SaisaProcessor", "expand_to_square", "open_image"]
