"""saisa: SAISA multimodal LLMs (and LLaVA-1.5 / NAAViT baselines) on any transformers decoder LLM."""

from transformers import AutoConfig, AutoModelForImageTextToText

from saisa.configuration_saisa import SaisaConfig
from saisa.modeling import SaisaForConditionalGeneration, SaisaPreTrainedModel

AutoConfig.register("saisa", SaisaConfig)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration)

__all__ = ["SaisaConfig", "SaisaForConditionalGeneration", "SaisaPreTrainedModel"]
