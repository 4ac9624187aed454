from saisa.modeling.saisa_model import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel

__all__ = ["SaisaForConditionalGeneration", "SaisaModel", "SaisaPreTrainedModel"]
