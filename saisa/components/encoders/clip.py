"""transformers' CLIP and SigLIP vision towers, read as LLaVA-1.5 reads them (a hidden layer, CLS dropped)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    PreTrainedConfig,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from saisa.components.encoders.base import (
    ImagePreprocessing,
    VisionEncoder,
    register_image_processor,
    register_vision_encoder,
)

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


@register_image_processor("CLIPImageProcessor")
def clip_image_processor(preprocessing: ImagePreprocessing) -> CLIPImageProcessorPil:
    """LLaVA-1.5's: shortest edge to the encoder's size, then a centre crop (a no-op on a padded square)."""
    side = preprocessing.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(preprocessing.image_mean),
        image_std=list(preprocessing.image_std),
    )


@register_image_processor("SiglipImageProcessor")
def siglip_image_processor(preprocessing: ImagePreprocessing) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(**preprocessing.square_settings())


@register_vision_encoder("clip_vision_model", "siglip_vision_model")
class TransformersVisionTower(VisionEncoder):
    def __init__(
        self, config: PreTrainedConfig, *, feature_layer: int, select_strategy: str, module: nn.Module | None = None
    ):
        super().__init__(config)
        self.model = module if module is not None else AutoModel.from_config(config)
        # what the tower keeps on one device is what transformers' CLIP / SigLIP declare
        self._no_split_modules = self.model._no_split_modules
        self.feature_layer = feature_layer
        self.drop_cls = config.model_type == "clip_vision_model" and select_strategy == "default"
        self.num_tokens = self.token_count(config, select_strategy)
        self.hidden_size = config.hidden_size
        siglip = config.model_type == "siglip_vision_model"
        mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (_CLIP_MEAN, _CLIP_STD)
        self.preprocessing = ImagePreprocessing(
            config.image_size, mean, std, "SiglipImageProcessor" if siglip else "CLIPImageProcessor"
        )

    @classmethod
    def token_count(cls, config: PreTrainedConfig, select_strategy: str) -> int:
        """The patch grid, plus CLIP's CLS token unless the "default" strategy drops it (SigLIP has none)."""
        cls_kept = config.model_type == "clip_vision_model" and select_strategy != "default"
        return (config.image_size // config.patch_size) ** 2 + int(cls_kept)

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
