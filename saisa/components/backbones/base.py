"""Decoder-LLM families. SAISA drives an unmodified transformers LLM through its public pieces: each decoder
layer's input norm and K/V projections (plus k-norm where the family has one) and the model's rotary embedding.
A family is one small file that registers a `DecoderFamily`; most are the Llama recipe with another name.

What device_map and FSDP must not split (a decoder layer) needs no declaration here: the transformers LLM declares its
own `_no_split_modules`, and transformers' `post_init` gathers it into the SAISA model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class DecoderFamily:
    name: str
    # (q, k, cos, sin) -> (q_rot, k_rot) on (N, heads, seq, head_dim); the family's own RoPE function.
    apply_rotary_pos_emb: Callable
    has_k_norm: bool = False  # Qwen3-style per-head RMSNorm on keys, applied before RoPE
    # The LLM's linears LoRA adapts (module names inside a decoder layer): every one, attention and MLP alike.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def decoder(self, language_model: PreTrainedModel) -> nn.Module:
        """The decoder (e.g. `LlamaModel`) of a causal LM, or the decoder itself."""
        return language_model if hasattr(language_model, "layers") else language_model.model

    def layers(self, language_model: PreTrainedModel) -> nn.ModuleList:
        return self.decoder(language_model).layers


DECODER_FAMILIES: dict[str, DecoderFamily] = {}


def register_decoder_family(family: DecoderFamily, *model_types: str) -> DecoderFamily:
    for model_type in model_types:
        DECODER_FAMILIES[model_type] = family
    return family


def decoder_family(config: PreTrainedConfig) -> DecoderFamily:
    try:
        return DECODER_FAMILIES[config.model_type]
    except KeyError:
        raise ValueError(
            f"unsupported LLM backbone {config.model_type!r}; supported: {sorted(DECODER_FAMILIES)} "
            "(add one with saisa.components.backbones.register_decoder_family)"
        ) from None
