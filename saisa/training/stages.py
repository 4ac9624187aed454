"""What each stage trains (SAISA.md §5): `align` = projector(s) only; `instruct` = projector(s) + LLM (full or LoRA).

The shared-MLP strategy: train one projector shared by all layers in `align`, then copy it into every per-layer
projector when `instruct` starts (`expand_shared_projector`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from saisa.components.backbones import decoder_family
from saisa.model import SaisaForConditionalGeneration

STAGES = ("align", "instruct")


def lora_targets(model: SaisaForConditionalGeneration) -> str:
    """LoRA targets inside the LLM only (the projectors are trained in full, the vision tower stays frozen): the
    linears its backbone family names."""
    names = "|".join(decoder_family(model.config.text_config).lora_targets)
    return rf".*language_model.*\.({names})"


@dataclass
class LoraSettings:
    r: int = 0  # 0 = no LoRA
    alpha: int = 16
    dropout: float = 0.05


def projector_module_names(model: SaisaForConditionalGeneration) -> list[str]:
    return ["layer_projectors" if model.config.per_layer_projectors else "projector"]


def expand_shared_projector(model: SaisaForConditionalGeneration) -> bool:
    """Shared projector -> one copy per layer. Returns whether anything changed."""
    if not (model.config.arch.per_layer_projectors and model.config.shared_projector):
        return False
    layers = model.config.text_config.num_hidden_layers
    holder = model.model  # SaisaModel holds the projectors
    holder.layer_projectors = nn.ModuleList(copy.deepcopy(holder.projector) for _ in range(layers))
    del holder.projector
    model.config.shared_projector = False
    return True


def configure_stage(
    model: SaisaForConditionalGeneration, stage: str, *, freeze_llm: bool = False, lora: LoraSettings | None = None
):
    """Set requires_grad for `stage`; returns the model to train (a peft model when LoRA is on)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    for name in projector_module_names(model):
        getattr(model, name).requires_grad_(True)
    if stage == "align":
        return model
    if lora is not None and lora.r > 0:
        from peft import LoraConfig, get_peft_model

        # peft cannot wrap a ModuleList whole: name the projectors' linears (nothing else is called linear_1/2)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_targets(model),
            modules_to_save=["linear_1", "linear_2"],
        )
        return get_peft_model(model, config)
    if not freeze_llm:
        model.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f} M trainable of {total / 1e6:.1f} M parameters ({100 * trainable / total:.1f}%)"
