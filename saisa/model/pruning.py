"""Training-free visual K/V pruning: each image keeps a fraction of its visual keys and values, chosen by how much
attention the text gives them (FastV's score).

`config.visual_pruning` (None = off) turns it on, as `{"keep_ratio": r, "method": ..., "score_layer": K}`
(`VisualPruning`). It acts when a forward call in inference (eval mode, no labels) prefills images; in training, or
when labels are given, every visual token is kept. Each image keeps `kept(v)` = ceil(r v) of its v visual K/V entries,
ranked by the FastV score: the mean, over heads and over the call's real text queries that see the image, of the
softmax attention probability (over every key the query sees, as the layer itself attends) each visual key gets.

- "fastv": scored at layer K; every later layer uses the kept entries only. SAISA gathers the image's kept tokens and
  makes only their K/V at those layers (its projector, K/V projections and attention columns shrink); LLaVA and NAAViT,
  whose visual tokens are rows of the hidden sequence, hide the pruned visual keys from every query after layer K.
- "per_layer" (SAISA only: its visual K/V are made afresh in every layer, while LLaVA's visual tokens flow from layer
  to layer): every layer keeps its own top entries by its own score, and its text attends to those only, in the
  prefill as in decoding. The score needs every visual key, so every layer still makes all of them: this saves
  KV-cache memory and decode FLOPs, not prefill FLOPs.

After the prefill every layer's KV cache holds exactly kept(v) entries per image (the layers that ran in full, up to
fastv's score layer, are compacted with its selection), so the one `KeyLayout` describes every layer: an image's
visual entries become k entries at positions inside its span, which is all the mask needs of them (the keys were
rotated at their own positions before they were cached). Decode steps attend to the kept entries only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from saisa.compat import CACHE_KWARG
from saisa.model.architectures import Architecture

if TYPE_CHECKING:
    from saisa.components.backbones import DecoderFamily
    from saisa.model.layout import KeyLayout, SequenceLayout
    from saisa.model.visual_kv import VisualPrefix

PRUNING_KWARG = "saisa_visual_pruning"
METHODS = ("fastv", "per_layer")


@dataclass(frozen=True)
class VisualPruning:
    """keep_ratio: the fraction r of each image's visual K/V kept, 0 < r <= 1; method: "fastv" (score at
    `score_layer`, prune every later layer) or "per_layer" (SAISA only: each layer its own selection, in the cache)."""

    keep_ratio: float
    method: str = "fastv"
    score_layer: int = 2

    def __post_init__(self):
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise ValueError(f"visual_pruning keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"visual_pruning keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.method not in METHODS:
            raise ValueError(f"visual_pruning method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.score_layer, bool) or not isinstance(self.score_layer, int) or self.score_layer < 0:
            raise ValueError(f"visual_pruning score_layer must be a layer index >= 0, got {self.score_layer!r}")

    def kept(self, v: int) -> int:
        """Visual tokens an image of v keeps: max(1, ceil(r v)) (rounded first, so that 0.3 * 10 keeps 3)."""
        return max(1, math.ceil(round(self.keep_ratio * v, 9)))

    @classmethod
    def from_config(cls, value: VisualPruning | dict | None) -> VisualPruning | None:
        """None (off), a dict as config.json holds it, or a `VisualPruning`."""
        if value is None or isinstance(value, VisualPruning):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"visual_pruning must be None, a dict or a VisualPruning, got {type(value).__name__}")
        unknown = set(value) - {"keep_ratio", "method", "score_layer"}
        if unknown or "keep_ratio" not in value:
            raise ValueError(
                "visual_pruning takes keep_ratio (required), method and score_layer; "
                f"got {sorted(value)}" + (f" (unknown: {sorted(unknown)})" if unknown else "")
            )
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, *, num_layers: int, arch: Architecture) -> None:
        """Raises unless this pruning fits a model of `num_layers` decoder layers and architecture `arch`."""
        if self.score_layer >= num_layers:
            raise ValueError(
                f"visual_pruning score_layer {self.score_layer} is past the LLM's {num_layers} layers "
                f"(0 .. {num_layers - 1})"
            )
        if self.method == "per_layer" and not arch.visual_keys_values_only:
            raise ValueError(
                f"visual_pruning method 'per_layer' needs SAISA's per-layer visual K/V; in {arch.name!r} the visual "
                "tokens flow from layer to layer, so a token pruned in one layer is gone from the next: use 'fastv'"
            )


def visual_scores(
    module: nn.Module,
    family: DecoderFamily,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    keys_before: torch.Tensor,
    queries: torch.Tensor,
    visual_columns: slice,
) -> torch.Tensor:
    """FastV scores (B, Vb) of the visual keys in `visual_columns`, for attention module `module` as it is about to
    run: mean over heads and over the queries that see each key of its softmax probability.

    hidden_states: (B, S, h) the module's input; its last T rows are the call's input columns. attention_mask:
    (B, 1, S, keys) the layer's own (additive or boolean). keys_before: (B, kv_heads, keys - S, head_dim) the layer's
    keys that precede this call's own (cached entries; SAISA: and this call's visual keys, rotated). queries: (B, T)
    the input columns that score (real text)."""
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)  # (B, S, heads, head_dim)
    q, k = module.q_proj(hidden_states).view(shape), module.k_proj(hidden_states).view(shape)
    if family.has_k_norm:  # the families with a k-norm have a q-norm too
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = position_embeddings
    q, k = family.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, heads|kv_heads, S, hd)
    length = queries.shape[1]
    q = q[:, :, -length:].float()  # (B, heads, T, hd)
    keys = torch.cat([keys_before.to(k), k], 2).float()  # (B, kv_heads, keys, hd)
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], 1)  # (B, heads, keys, hd)
    mask = attention_mask[:, :, -length:]  # (B, 1, T, keys)
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    logits = (q @ keys.transpose(2, 3)) * module.scaling  # (B, heads, T, keys)
    probs = logits.masked_fill(~seen, -math.inf).softmax(-1)
    visual = probs[..., visual_columns].mean(1)  # (B, T, Vb)
    counted = seen[:, 0, :, visual_columns] & queries[:, :, None]  # (B, T, Vb)
    return (visual * counted).sum(1) / counted.sum(1).clamp(min=1)  # (B, Vb)


class PruningPass:
    """One prefill forward call's pruning, handed to every attention module (`saisa.model.attention`) and then asked
    to compact the KV cache and its layout."""

    def __init__(
        self,
        pruning: VisualPruning,
        *,
        family: DecoderFamily,
        seq: SequenceLayout,
        prior: KeyLayout,
        prefix: VisualPrefix | None,
    ):
        """seq: the call's layout; prior: what the cache held before it; prefix: SAISA's visual K/V (None for LLaVA /
        NAAViT, whose visual tokens are in the hidden sequence)."""
        self.pruning, self.family, self.seq, self.prior, self.prefix = pruning, family, seq, prior, prefix
        self.k = pruning.kept(seq.tokens_per_image)
        self._score_slots: torch.Tensor | None = None  # fastv: (B, Vk) the visual block's slots kept at the score layer
        self._pruned: tuple[SequenceLayout, torch.Tensor] | None = None  # fastv: kept layout, (N, k) offsets
        self._mask_after: torch.Tensor | None = None  # fastv: the mask of every layer after the score layer

    @property
    def _fastv(self) -> bool:
        return self.pruning.method == "fastv"

    def before_attention(self, module: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Called by attention module `module` before it runs (kwargs: its keyword arguments, changed in place):
        scores and selects where this layer does, puts the pruned mask in place where the layer attends to the kept
        entries only. Returns the layer's visual keys (rotated) and values for SAISA, (B, kv_heads, visual slots,
        head_dim) each, else None."""
        layer = module.layer_idx
        if self._fastv and layer > self.pruning.score_layer:
            kwargs["attention_mask"] = self._mask_after
            return self.prefix.layer(layer, kept=self._pruned) if self.prefix is not None else None
        visual = self.prefix.layer(layer) if self.prefix is not None else None
        if self._fastv and layer < self.pruning.score_layer:
            return visual
        offsets = self._select(module, kwargs, visual)  # (N, k)
        slots = self.seq.kept_slots(offsets)  # (B, Vk)
        if self._fastv:
            self._score_slots = slots
            self._pruned = (self.seq.pruned(slots, self.k), offsets)
            self._mask_after = self._pruned_mask(kwargs["attention_mask"], slots)
            return visual
        # per_layer: this layer's text attends to its own kept entries, the ones `compact` would keep in the cache
        kwargs["attention_mask"] = self._pruned_mask(kwargs["attention_mask"], slots)
        index = slots[:, None, :, None].expand(-1, visual[0].shape[1], -1, visual[0].shape[-1])
        return visual[0].gather(2, index), visual[1].gather(2, index)  # (B, kv_heads, Vk, head_dim) each

    def _select(self, module: nn.Module, kwargs: dict, visual: tuple[torch.Tensor, torch.Tensor] | None):
        """(N, k) each image's kept visual tokens by this layer's FastV score, ascending."""
        seq, prior_entries = self.seq, self.prior.positions.shape[1]
        cache = kwargs.get(CACHE_KWARG)
        hidden = kwargs["hidden_states"]  # (B, S, h)
        before = hidden.new_zeros(hidden.shape[0], module.k_proj.out_features // module.head_dim, 0, module.head_dim)
        if cache is not None and prior_entries:
            before = cache.layers[module.layer_idx].keys  # (B, kv_heads, P, head_dim)
        if visual is not None:
            before = torch.cat([before, visual[0].to(before)], 2)
        scores = visual_scores(
            module,
            self.family,
            hidden,
            kwargs["position_embeddings"],
            kwargs["attention_mask"],
            before,
            seq.text_attendable,
            slice(prior_entries, prior_entries + seq.block_size),
        )  # (B, Vb)
        v = seq.tokens_per_image
        slots = seq.image_first_slot[:, None] + torch.arange(v, device=scores.device)  # (N, v)
        per_image = scores[seq.image_batch_index[:, None], slots]  # (N, v)
        return per_image.topk(self.k, dim=1).indices.sort(1).values

    def _columns(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, P + Vk + T) the key columns kept of the layer's (B, P + Vb + T): cached, kept visual, input columns."""
        batch, prior_entries = slots.shape[0], self.prior.positions.shape[1]
        device, length = slots.device, self.seq.text_positions.shape[1]
        cached = torch.arange(prior_entries, device=device).expand(batch, -1)
        text = torch.arange(length, device=device).expand(batch, -1) + prior_entries + self.seq.block_size
        return torch.cat([cached, slots + prior_entries, text], 1)

    def _pruned_mask(self, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The mask (B, 1, Q, keys) of the layers after the score layer. SAISA: the kept key columns only. LLaVA /
        NAAViT: every column, the pruned visual keys hidden from every query but their own token's."""
        if self.prefix is not None:
            columns = self._columns(slots)  # (B, P + Vk + T)
            return mask.gather(3, columns[:, None, None, :].expand(*mask.shape[:3], -1))
        prior_entries, block = self.prior.positions.shape[1], self.seq.block_size
        kept = torch.zeros_like(self.seq.visual_valid).scatter_(1, slots, True)  # (B, Vb)
        hidden = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)  # (B, keys)
        hidden[:, prior_entries : prior_entries + block] = ~kept
        hidden = hidden[:, None, None, :].expand(-1, 1, mask.shape[2], -1).clone()  # (B, 1, Q, keys)
        own = torch.arange(block, device=mask.device)
        hidden[:, :, own, prior_entries + own] = False  # the visual block's queries are the first Vb rows
        blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        return mask.masked_fill(hidden, blocked)

    def compact(self, cache) -> KeyLayout:
        """Keep each layer's kept visual entries in `cache` (a `SaisaCache`, or None) and return the layout it then
        holds. Only fastv's layers that ran in full need compacting: SAISA's later layers, and every per_layer layer
        (SAISA only), ran on their kept entries and already hold them."""
        score_layer = self.pruning.score_layer
        for layer, entries in enumerate(cache.layers if cache is not None and self._fastv else []):
            if not entries.is_initialized or (self.prefix is not None and layer > score_layer):
                continue
            columns = self._columns(self._score_slots)  # (B, P + Vk + T)
            index = columns[:, None, :, None].expand(-1, entries.keys.shape[1], -1, entries.keys.shape[-1])
            entries.keys, entries.values = entries.keys.gather(2, index), entries.values.gather(2, index)
        if self._fastv:
            kept = self._pruned[0]
        else:  # each layer's own selection: the layout takes each image's first k positions, all inside its span
            first = torch.arange(self.k, device=self.seq.image_first_slot.device).expand(self.seq.num_images, -1)
            kept = self.seq.pruned(self.seq.kept_slots(first), self.k)
        return self.prior.extend(kept)
