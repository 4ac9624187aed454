"""SAISA on vLLM: `vllm serve DIR` and `vllm.LLM(DIR)` run our checkpoints with vLLM's engine (paged KV cache,
continuous batching, chunked prefill, prefix caching, tensor parallelism, its OpenAI server).

`pip install "saisa[vllm]"` registers `register` under the `vllm.general_plugins` entry point; vLLM calls it in every
process it starts. The model (`saisa.integrations.vllm.model`) is named by a "module:Class" string, so it is imported
only when a saisa checkpoint is loaded.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "SaisaForConditionalGeneration"  # config.json's `architectures` in our folders


def register() -> None:
    """vLLM plugin hook. Never raises: a plugin that fails breaks every vLLM use in its environment."""
    try:
        from vllm import ModelRegistry

        import saisa  # noqa: F401  (registers SaisaConfig and SaisaProcessor with transformers' Auto classes)

        ModelRegistry.register_model(ARCHITECTURE, "saisa.integrations.vllm.model:SaisaForVLLM")
    except Exception as error:  # an incomplete install must not take other vLLM models down with it
        logger.warning("saisa vLLM plugin not registered (%s: %s)", type(error).__name__, error)
