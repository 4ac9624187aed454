"""Image KV cache: in SAISA a visual token's per-layer K/V depend only on the image and the weights that produce them
(and, through RoPE, on where the image sits), so they are stored per image content, before RoPE, tagged with a
`WeightsVersion`, and rotated at whatever position the image is used. A hit skips the vision encoder, the L projectors
and the L visual K/V projections.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # one image's, per layer: keys before RoPE, values; (kv_heads, v, hd)


def image_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S): its exact bytes, dtype and shape."""
    data = pixels.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy())  # the raw bytes of any dtype, bfloat16 included
    return digest.hexdigest()


class WeightsVersion:
    """Which weights a set of modules holds now. Two versions are equal only if the same tensor objects (every
    parameter and buffer under the modules) hold the same storage at the same in-place version counter, so a version
    changes with:
    - an in-place update: `optimizer.step`, `load_state_dict`, a `copy_`/`mul_` under `torch.no_grad` (version counter);
    - new storage: `.to(dtype)`, `.to(device)`, `param.data = ...` (`data_ptr`: the new storage is allocated while
      the old one lives, so its address differs; a whole-model `.to` also shows in the first tensor's dtype and device);
    - a replaced tensor or module: `module.weight = nn.Parameter(...)`, `load_state_dict(assign=True)`, a LoRA merge
      that unloads the adapter modules (tensor identity, held by weak reference so it is never recycled).
    Not seen: writes through `param.data` (a separate version counter, by autograd's design) and state that is not a
    tensor (peft's adapter enable/disable): call `ImageKVCache.clear()` after those.

    Costs one pass over the tensors, once per forward that carries images (not per decoded token).
    """

    __slots__ = ("_refs", "_state", "requires_grad")

    def __init__(self, modules: Iterable[nn.Module]):
        tensors, stack = [], list(modules)
        while stack:  # not Module.parameters(): it builds every name, and this runs on every forward with images
            module = stack.pop()
            tensors += (t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
            stack += (m for m in module._modules.values() if m is not None)
        self.requires_grad = any(t.requires_grad for t in tensors)
        self._refs = tuple(map(weakref.ref, tensors))  # a live tensor's weak reference is one cached object
        # Raises RuntimeError for tensors made under torch.inference_mode: they have no version counter.
        kind = (tensors[0].dtype, tensors[0].device) if tensors else None
        self._state = (tuple(t._version for t in tensors), tuple(t.data_ptr() for t in tensors), kind)

    @classmethod
    def of(cls, modules: Iterable[nn.Module]) -> WeightsVersion | None:
        """The version, or None where it cannot be known (weights made under torch.inference_mode)."""
        try:
            return cls(modules)
        except RuntimeError:
            return None

    def __eq__(self, other: object) -> bool:
        # `is`, not ==: a live referent makes weakref == compare tensors elementwise.
        if not isinstance(other, WeightsVersion) or self._state != other._state:
            return False
        return len(self._refs) == len(other._refs) and all(a is b for a, b in zip(self._refs, other._refs, strict=True))

    __hash__ = None


class ImageKVCache:
    """LRU over images, bounded by the bytes of the tensors it holds: compact copies it owns, so `bytes` is what it
    keeps alive. Entries belong to one weights version; a lookup or insert under another drops them all. Thread-safe.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[ImageKV, int]] = OrderedDict()
        self._version: object = None
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.invalidations = 0  # times entries were dropped because the weights changed

    def get(self, key: str, version: object = None) -> ImageKV | None:
        """The layers cached for image `key` under weights `version` (tensors owned by the cache: do not write)."""
        with self._lock:
            self._adopt(version)
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, layers: ImageKV, version: object = None) -> None:
        """Store a copy of `layers` (views into a batch are fine: only their own elements are copied)."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return  # larger than the whole budget: never cached
        # Own contiguous copies: a view would keep its whole batch tensor alive, unaccounted.
        layers = [
            (
                k.detach().clone(memory_format=torch.contiguous_format),
                v.detach().clone(memory_format=torch.contiguous_format),
            )
            for k, v in layers
        ]
        with self._lock:
            self._adopt(version)
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            self._entries[key] = (layers, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _adopt(self, version: object) -> None:
        if version != self._version:
            if self._entries:
                self.invalidations += 1
            self._entries.clear()
            self.bytes = 0
            self._version = version

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {
            "entries": len(self),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "invalidations": self.invalidations,
        }
