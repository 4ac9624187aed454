"""saisa: SAISA multimodal LLMs (and LLaVA-1.5 / NAAViT baselines) on any transformers decoder LLM."""

from transformers import AutoConfig, AutoModelForImageTextToText

from saisa.configuration_saisa import SaisaConfig
from saisa.modeling import SaisaForConditionalGeneration, SaisaPreTrainedModel
from saisa.modeling.image_kv_cache import ImageKVCache

AutoConfig.register("saisa", SaisaConfig)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration)

__all__ = ["ImageKVCache", "SaisaConfig", "SaisaForConditionalGeneration", "SaisaPreTrainedModel"]
