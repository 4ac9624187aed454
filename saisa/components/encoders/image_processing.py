"""`SaisaImageProcessor`: resize to a square, rescale, normalise, for encoders without a transformers image processor
(EfficientNet-Lite). LLaVA-1.5's pad-to-square happens before it, in `SaisaProcessor`, as for CLIP and SigLIP.

The PIL backend keeps outputs bit-identical to LLaVA-1.5's own PIL bicubic resize.
"""

from __future__ import annotations

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

from saisa.components.encoders.base import ImagePreprocessing, register_image_processor


class SaisaImageProcessor(PilBackend):
    resample = PILImageResampling.BICUBIC
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True


@register_image_processor("SaisaImageProcessor")
def saisa_image_processor(preprocessing: ImagePreprocessing) -> SaisaImageProcessor:
    return SaisaImageProcessor(**preprocessing.square_settings())
