"""`SaisaCache`: transformers' `DynamicCache` plus the layout of what it holds.

In SAISA the cache also holds every image's visual keys (SAISA.md §3: an image-conditioned per-layer KV prefix), so
its length is not a count of input_ids columns. The layout (`saisa.model.layout.KeyLayout`: each entry's position,
whether it is visual and attendable) travels with the cache, and every operation `generate` applies to a cache
(beam reordering, batch selection and expansion, cropping rejected draft tokens) applies to it too.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from saisa.model.layout import KeyLayout


class SaisaCache(DynamicCache):
    """Seen from outside, its length counts input_ids columns, as `generate` and assisted decoding expect; the
    visual keys inside are an implementation detail (`layout` says where they are)."""

    layout: KeyLayout | None = None  # set by SaisaForConditionalGeneration.forward once the cache holds anything

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layout.num_input_tokens if self.layout is not None else 0

    def entries(self) -> list[int]:
        """How many keys each layer holds (visual ones included)."""
        return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers]

    def truncate(self, entries: list[int]) -> None:
        """Back to `entries()` as it was: undoes what a failed forward wrote."""
        for layer, kept in zip(self.layers, entries + [0] * (len(self.layers) - len(entries)), strict=True):
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[..., :kept, :], layer.values[..., :kept, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.layout is not None:
            self.layout = self.layout.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.layout is not None:
            self.layout = self.layout.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.layout is not None:
            rows = torch.arange(self.layout.positions.shape[0]).repeat_interleave(repeats)
            self.layout = self.layout.select_rows(rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` input tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(
                "SaisaCache.crop takes a negative count of tokens to remove (its length also counts "
                "visual keys, so an absolute length would be ambiguous)"
            )
        layout = self.layout.drop_last_tokens(-tokens_to_remove) if self.layout is not None else None  # checks first
        super().crop(tokens_to_remove)
        self.layout = layout
