"""A disk cache of a frozen vision encoder's patch features, for training and evaluation runs that see the same images
again (other epochs, the second stage, other architectures or seeds sharing one encoder).

An entry is keyed by the preprocessed pixels' bytes (so a changed image size, crop, normalisation or image never
matches) and by a fingerprint of every encoder weight and buffer (so another encoder, or the same one after any
update, never matches). Only a frozen encoder is served from the cache: with a trainable one the features change at
every step and their gradients are needed, so the encoder runs as usual.

One file per image (safetensors), written under a temporary name and renamed, so concurrent ranks and a killed run
never leave a torn entry. Not for ZeRO-3 or FSDP: there the encoder's parameters are sharded and every rank must call
it in step with the others, which a per-rank hit would break (`run_training` refuses that combination).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from saisa.model.image_kv_cache import WeightsVersion, image_key


class VisionFeatureCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self._fingerprint: tuple[WeightsVersion | None, str] | None = None

    def encode(self, encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, v, d_vis), as `encoder(pixel_values)`; from the cache where an entry exists."""
        if torch.is_grad_enabled() and (
            pixel_values.requires_grad or any(p.requires_grad for p in encoder.parameters())
        ):
            return encoder(pixel_values)  # gradients must reach the encoder or the pixels: nothing to reuse
        # the mode too: an encoder in training mode (dropout, batch statistics) gives other features
        prefix = f"{self.encoder_fingerprint(encoder)}:training={encoder.training}"
        keys = [hashlib.sha256(f"{prefix}:{image_key(p)}".encode()).hexdigest() for p in pixel_values]
        found = [self._read(key) for key in keys]
        missing = [i for i, features in enumerate(found) if features is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                fresh = encoder(pixel_values[missing])  # (M, v, d_vis)
            for i, features in zip(missing, fresh, strict=True):
                found[i] = features
                self._write(keys[i], features)
        return torch.stack([features.to(pixel_values.device) for features in found])

    def encoder_fingerprint(self, encoder: nn.Module) -> str:
        """sha256 of the encoder's class and every parameter and buffer (names, dtypes, shapes, bytes); recomputed
        only when the weights' version changes (`WeightsVersion`), so a step costs one pass over tensor metadata."""
        version = WeightsVersion.of([encoder])
        if self._fingerprint is not None and version is not None and self._fingerprint[0] == version:
            return self._fingerprint[1]
        digest = hashlib.sha256(type(encoder).__qualname__.encode())
        for name, tensor in encoder.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{image_key(tensor.reshape(1, -1))}".encode())
        self._fingerprint = (version, digest.hexdigest())
        return self._fingerprint[1]

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.exists():
            return None
        return load_file(path)["features"]

    def _write(self, key: str, features: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"features": features.detach().to("cpu").contiguous()}, temporary)
            os.replace(temporary, path)  # atomic: a reader sees no file or a whole one
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
