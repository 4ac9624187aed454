"""The vision-to-LLM projector: LLaVA-1.5's `mlp2x_gelu` (Linear d_vis -> h, GELU, Linear h -> h). How many a model
has, and where each projects to, is `saisa.model.visual_kv.add_projectors`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class MLPProjector(nn.Module):
    """Keys `linear_1`/`linear_2`, as transformers' `LlavaMultiModalProjector`, so llava-hf weights map one to one."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, *, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., d_vis) -> (..., h)
        return self.linear_2(self.act(self.linear_1(features)))
