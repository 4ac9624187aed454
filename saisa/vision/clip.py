"""transformers' CLIP and SigLIP vision towers, read as LLaVA-1.5 reads them (a hidden layer, CLS dropped)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModel, PreTrainedConfig, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from saisa.vision import ImagePreprocessing, VisionEncoder, register_vision_encoder

VISION_MODEL_CLASSES = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


def load_vision_model(folder: str) -> nn.Module:
    """The vision half of a local CLIP / SigLIP checkpoint (a full CLIP folder works: its text half is skipped)."""
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in VISION_MODEL_CLASSES:
        raise ValueError(
            f"{folder}: unsupported vision checkpoint {model_type!r}; one of {sorted(VISION_MODEL_CLASSES)}"
        )
    return VISION_MODEL_CLASSES[model_type].from_pretrained(folder, dtype=torch.float32)


_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@register_vision_encoder("clip_vision_model", "siglip_vision_model")
class TransformersVisionTower(VisionEncoder):
    def __init__(
        self, config: PreTrainedConfig, *, feature_layer: int, select_strategy: str, module: nn.Module | None = None
    ):
        super().__init__(config)
        self.model = module if module is not None else AutoModel.from_config(config)
        self.feature_layer = feature_layer
        has_cls = config.model_type == "clip_vision_model"  # SigLIP has no CLS token
        self.drop_cls = has_cls and select_strategy == "default"
        patches = (config.image_size // config.patch_size) ** 2
        self.num_tokens = patches + (1 if has_cls and not self.drop_cls else 0)
        self.hidden_size = config.hidden_size
        siglip = config.model_type == "siglip_vision_model"
        mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (_CLIP_MEAN, _CLIP_STD)
        self.preprocessing = ImagePreprocessing(
            config.image_size, mean, std, "SiglipImageProcessor" if siglip else "CLIPImageProcessor"
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, v, d_vis)
        return self.encode(pixel_values).last_hidden_state

    def encode(
        self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutputWithPooling:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True, output_attentions=output_attentions)
        hidden = out.hidden_states[self.feature_layer]
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden[:, 1:] if self.drop_cls else hidden,
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions if output_attentions else None,
        )
