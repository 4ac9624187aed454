"""The transformers APIs that moved inside the range we support (pyproject.toml: 5.19 up to the newest 5.x).

transformers 5.23 renamed the KV cache's keyword and output field from `past_key_values` to `cache` (the old keyword is
still accepted, deprecated, until 5.40; outputs only have the new field). vLLM pins transformers below 5.21, so both
names must work.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output):
    """The KV cache a forward or `generate(return_dict_in_generate=True)` returned."""
    return getattr(output, CACHE_KWARG)


def training_arguments(settings: dict) -> dict:
    """`settings` for this transformers' TrainingArguments: 5.23 renamed `gradient_checkpointing(_kwargs)` to
    `activation_checkpointing(_kwargs)`; recipes use the new names."""
    from transformers import TrainingArguments

    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return settings
    return {key.replace("activation_checkpointing", "gradient_checkpointing"): value for key, value in settings.items()}
