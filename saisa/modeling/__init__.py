from saisa.modeling.saisa_model import SaisaForConditionalGeneration, SaisaPreTrainedModel

__all__ = ["SaisaForConditionalGeneration", "SaisaPreTrainedModel"]
