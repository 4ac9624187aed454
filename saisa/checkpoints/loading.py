"""The one loader: a saved folder of any layout the project reads -> (model, processor), on a device and dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from saisa.checkpoints.foreign import detect_layout, load_foreign, processor_for_foreign
from saisa.model import SaisaForConditionalGeneration
from saisa.model.image_kv_cache import ImageKVCache
from saisa.processing import SaisaProcessor


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, else fp32 (CPU kernels are fastest and exact in fp32)."""
    on_cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def load_pretrained(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    architecture: str | None = None,
    image_cache_mib: int = 0,
):
    """(model in eval mode, processor) from our folders, LLaVA-1.5 and llava-hf folders and the authors' SAISA releases
    (those three converted on load; `saisa convert` writes the converted folder once).

    device: default CUDA when available; dtype: default bf16 on a GPU that supports it, else fp32 (a name such as
    "bfloat16" works too); architecture: only for foreign folders (e.g. start SAISA from a LLaVA checkpoint);
    image_cache_mib > 0 gives a SAISA model an image KV cache of that budget.
    """
    device = torch.device(device or default_device())
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or default_dtype(device)
    model = load_model(path, dtype=dtype, architecture=architecture)
    ours = detect_layout(path) == "saisa"
    processor = SaisaProcessor.from_pretrained(path) if ours else processor_for_foreign(path, model)
    model = model.to(device).eval()
    if image_cache_mib > 0 and model.config.arch.visual_keys_values_only:
        model.image_kv_cache = ImageKVCache(image_cache_mib * 2**20)
    return model, processor


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, architecture: str | None = None):
    """The model alone (on the CPU, train mode as transformers leaves it) of any folder `load_pretrained` reads."""
    folder = Path(path)
    if detect_layout(folder) == "saisa":
        return SaisaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    return load_foreign(folder, architecture=architecture, dtype=dtype)


def add_device_arguments(parser) -> None:
    """--device / --dtype for every command that runs a model."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on a GPU that supports it, else float32",
    )
