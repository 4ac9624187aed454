"""saisa: SAISA multimodal LLMs (and LLaVA-1.5 / NAAViT baselines) on any transformers decoder LLM."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from saisa.configuration_saisa import SaisaConfig
from saisa.loading import load_pretrained
from saisa.modeling import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel
from saisa.modeling.image_kv_cache import ImageKVCache
from saisa.processing import SaisaProcessor
from saisa.vision.efficientnet import EfficientNetLiteConfig
from saisa.vision.image_processing import SaisaImageProcessor

# Saved folders name these classes (config.json `model_type`, processor_config.json `processor_class` and
# `image_processor_type`): after `import saisa` every Auto class and `pipeline("image-text-to-text")` resolve them.
AutoConfig.register("saisa", SaisaConfig)
# As transformers registers Llava: AutoModel gives the base model, the image-text-to-text class the one with the head.
AutoModel.register(SaisaConfig, SaisaModel)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration)
AutoProcessor.register(SaisaConfig, SaisaProcessor)
AutoImageProcessor.register(EfficientNetLiteConfig, image_processor_classes={"pil": SaisaImageProcessor})

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
