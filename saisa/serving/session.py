"""Loading a saved model for inference (chat, serve)."""

from __future__ import annotations

import torch


def load_for_inference(folder: str, *, image_cache_mib: int = 1024, device: str | None = None):
    from saisa import SaisaForConditionalGeneration
    from saisa.modeling.image_kv_cache import ImageKVCache
    from saisa.processing import SaisaProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = SaisaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    if image_cache_mib > 0 and model.config.architecture == "saisa":
        model.image_kv_cache = ImageKVCache(image_cache_mib * 2**20)
    return model, SaisaProcessor.from_pretrained(folder)
