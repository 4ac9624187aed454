"""Tiny random-weight configs of real transformers classes, shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

import saisa  # noqa: F401  (registers the config with the Auto classes)
from saisa import SaisaConfig, SaisaForConditionalGeneration
from saisa.components.encoders import ImagePreprocessing
from saisa.processing import SaisaProcessor

VOCAB = 120
IMAGE_TOKEN = VOCAB  # outside the LLM vocabulary, as the processor's added <image> token is

TEXT_SIZES = dict(  # a tiny decoder of any family; tests/test_register_components.py builds a Phi from it
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def text_config(family: str = "llama", **overrides):
    kwargs = {**TEXT_SIZES, **overrides}
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs)
    if family == "qwen3":
        return Qwen3Config(head_dim=8, **kwargs)
    raise ValueError(family)


def vision_config(kind: str = "clip"):
    common = dict(
        hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=4
    )
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def tiny_model(
    architecture: str = "saisa",
    family: str = "llama",
    vision: str = "clip",
    seed: int = 0,
    image_token_id: int = IMAGE_TOKEN,
    **config_kwargs,
) -> SaisaForConditionalGeneration:
    torch.manual_seed(seed)
    config = SaisaConfig(
        text_config=text_config(family),
        vision_config=vision_config(vision),
        architecture=architecture,
        image_token_id=image_token_id,
        **config_kwargs,
    )
    model = SaisaForConditionalGeneration(config).eval()
    # Random-init biases are zero; make them matter so a reference that forgets one fails.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


WORDS = ["<pad>", "<s>", "</s>", "user", "assistant", ":", "what", "is", "this", "?", "a", "cat", "and", "\n"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_processor(image_size: int = 16) -> SaisaProcessor:
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    return SaisaProcessor(tokenizer, ImagePreprocessing(image_size, (0.5,) * 3, (0.5,) * 3), chat_template=TEMPLATE)


def tiny_chat_processor() -> SaisaProcessor:
    """A word-level tokenizer covering the tiny model's whole vocabulary (so every generated id decodes to text),
    with a chat template; its <image> token gets id VOCAB, the tiny models' IMAGE_TOKEN."""
    words = ["<pad>", "<s>", "</s>", "user", "assistant", ":", "what", "is", "this", "?", "\n"]
    words += [f"w{i}" for i in range(len(words), VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    processor = SaisaProcessor(tokenizer, ImagePreprocessing(16, (0.5,) * 3, (0.5,) * 3), chat_template=TEMPLATE)
    assert processor.image_token_id == IMAGE_TOKEN
    return processor


def hf_llava_with_weights_of(model, *, image_token_index: int):
    """transformers' LlavaForConditionalGeneration holding our `llava` model's weights (mapped by hand)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=model.config.vision_config,
        text_config=model.config.text_config,
        image_token_index=image_token_index,
        image_seq_length=model.tokens_per_image,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(config).eval()
    state = {f"model.language_model.{k}": v for k, v in model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    state.update({f"model.vision_tower.{k}": v for k, v in model.vision_tower.model.state_dict().items()})
    state.update({f"model.multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def torchrun(*args: str, cwd=None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` on CPU ranks (gloo), one thread each, this folder importable."""
    tests = str(Path(__file__).parent)
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    env["PYTHONPATH"] = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ, **env})


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
