"""Image KV cache: in SAISA a visual token's per-layer K/V depend only on the image (and, through RoPE, on where it
sits), so they are stored per image content, before RoPE, and rotated at whatever position the image is used.
A hit skips the vision encoder, the L projectors and the L visual K/V projections.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys before RoPE, values; (kv_heads, v, head_dim)


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


class ImageKVCache:
    """LRU over images, bounded by the bytes of the tensors it holds. Thread-safe."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[LayerKV, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> LayerKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, layers: LayerKV) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return  # larger than the whole budget: never cached
        layers = [(k.detach(), v.detach()) for k, v in layers]
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            self._entries[key] = (layers, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses}
