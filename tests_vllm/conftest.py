"""Tiny random-weight saisa checkpoints for vLLM (head_dim 32: the smallest vLLM's CPU attention takes) and the
reference they are compared with: our transformers model holding the same weights."""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

from saisa import SaisaConfig, SaisaForConditionalGeneration

# In-process engine (starts in seconds), 1 GiB of KV cache, no thread pinning: a 2-core CI machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

_spec = importlib.util.spec_from_file_location("saisa_tests", Path(__file__).parents[1] / "tests" / "conftest.py")
saisa_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(saisa_tests)  # the main suite's tiny tokenizer and vision configs
VOCAB, IMAGE_TOKEN, tiny_chat_processor = saisa_tests.VOCAB, saisa_tests.IMAGE_TOKEN, saisa_tests.tiny_chat_processor

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def vision_config(kind: str):
    if kind == "efficientnet":
        from saisa.components.encoders.efficientnet import EfficientNetLiteConfig

        return EfficientNetLiteConfig(
            image_size=64
        )  # 2 x 2 grid of 1280 features: d_vis > h, as in the embedded default
    common = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16)
    return CLIPVisionConfig(patch_size=4, **common) if kind == "clip" else SiglipVisionConfig(patch_size=4, **common)


def tiny_model(architecture="saisa", family="llama", vision="clip", seed=0) -> SaisaForConditionalGeneration:
    torch.manual_seed(seed)
    config = SaisaConfig(
        text_config=TEXT_CONFIGS[family](**_TEXT),
        vision_config=vision_config(vision),
        architecture=architecture,
        image_token_id=IMAGE_TOKEN,
    )
    model = SaisaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random-init biases and norms are 0 / 1: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_checkpoint(model, folder: Path, **processor_kwargs) -> Path:
    """The model and a processor for its encoder's own preprocessing (`processor_kwargs`: AnyRes tiling, say), as a
    folder vLLM and we both load."""
    from saisa.processing import SaisaProcessor

    processor = SaisaProcessor(tiny_chat_processor().tokenizer, model.vision_tower.preprocessing, **processor_kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def start_llm(folder: Path, **kwargs):
    from vllm import LLM

    settings = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0, gpu_memory_utilization=0.5)
    return LLM(str(folder), **{**settings, **kwargs})


def stop_llm(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
