"""saisa: SAISA multimodal LLMs (and LLaVA-1.5 / NAAViT baselines) on any transformers decoder LLM."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from saisa.checkpoints.loading import load_pretrained
from saisa.components.encoders.image_processing import SaisaImageProcessor
from saisa.model import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel
from saisa.model.configuration import SaisaConfig
from saisa.model.image_kv_cache import ImageKVCache
from saisa.processing import SaisaProcessor

# Saved folders name these classes (config.json `model_type`, processor_config.json `processor_class`; each encoder's
# file registers its own config and image processor): after `import saisa` every Auto class and
# `pipeline("image-text-to-text")` resolve them.
AutoConfig.register("saisa", SaisaConfig)
# As transformers registers Llava: AutoModel gives the base model, the image-text-to-text class the one with the head.
AutoModel.register(SaisaConfig, SaisaModel)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration)
AutoProcessor.register(SaisaConfig, SaisaProcessor)

__all__ = [
    "ImageKVCache",
    "SaisaConfig",
    "SaisaForConditionalGeneration",
    "SaisaImageProcessor",
    "SaisaModel",
    "SaisaPreTrainedModel",
    "SaisaProcessor",
    "load_pretrained",
]
