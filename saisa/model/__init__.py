"""The SAISA model: its config, the visual K/V equation, the forward (SAISA and the LLaVA-1.5 / NAAViT baselines), the
KV caches."""

from saisa.model.configuration import SaisaConfig
from saisa.model.modeling import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel

__all__ = ["SaisaConfig", "SaisaForConditionalGeneration", "SaisaModel", "SaisaPreTrainedModel"]
