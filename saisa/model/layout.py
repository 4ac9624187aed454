"""Where every token sits: positions, which keys a query may see, and the attention mask (SAISA.md §3).

One layout serves all three architectures. Per sample, the keys of a forward are
`[keys already cached] + [this call's visual block] + [this call's text tokens]`, where the visual block holds the
images of the call in order (v slots each, padded to the batch's largest block). Order in the key set is
irrelevant to attention; positions and the mask carry the sequence. An image placeholder in `input_ids` takes v
positions, as in LLaVA; the placeholder itself stays in the text stream as an inert token nobody attends to, so
logits and labels keep `input_ids`' layout.

The rule, with `pos` the LLaVA position of every token: a query sees an attendable key iff `pos(key) <= pos(query)`.
NAAViT removes visual-to-visual pairs (a visual query still sees itself); SAISA has no visual queries at all.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def _to_device(layout, device: torch.device):
    """A copy of a layout dataclass with every tensor on `device`."""
    return replace(
        layout,
        **{
            f.name: getattr(layout, f.name).to(device)
            for f in fields(layout)
            if isinstance(getattr(layout, f.name), torch.Tensor)
        },
    )


@dataclass
class SequenceLayout:
    """Layout of one forward call's new tokens."""

    text_positions: torch.Tensor  # (B, T) position of each input token (a placeholder: its image's first position)
    text_attendable: torch.Tensor  # (B, T) real text: neither padding nor an image placeholder
    is_image: torch.Tensor  # (B, T) image placeholders
    visual_positions: torch.Tensor  # (B, Vb) positions of the visual block's slots
    visual_valid: torch.Tensor  # (B, Vb) slot holds a real visual token
    image_batch_index: torch.Tensor  # (N,) sample of each image, images in input order
    image_first_slot: torch.Tensor  # (N,) first slot of each image in its sample's visual block
    last_slot_of_placeholder: torch.Tensor  # (B, T) slot of the image's last visual token at placeholders, else 0
    next_position: torch.Tensor  # (B,) first position after this call's tokens
    tokens_per_image: int

    def to(self, device: torch.device) -> "SequenceLayout":
        return _to_device(self, device)

    @property
    def num_images(self) -> int:
        return int(self.image_batch_index.numel())

    @property
    def block_size(self) -> int:
        return int(self.visual_positions.shape[1])

    def scatter_images(self, per_image: torch.Tensor) -> torch.Tensor:
        """(N, v, *rest) per image -> (B, Vb, *rest) visual block, zeros in empty slots."""
        batch, block = self.visual_positions.shape
        if self.num_images == batch and block == self.tokens_per_image:  # one image per sample: already in place
            return per_image
        if self.num_images == 0:  # a phantom image (see SaisaForConditionalGeneration._phantom_image): no slots,
            return per_image[:1, :0].expand(batch, 0, *per_image.shape[2:])  # but a (zero) gradient to its weights
        out = per_image.new_zeros(batch, block, *per_image.shape[2:])
        slots = self.image_first_slot[:, None] + torch.arange(
            self.tokens_per_image, device=self.image_first_slot.device
        )  # (N, v)
        out[self.image_batch_index[:, None], slots] = per_image
        return out

    def kept_slots(self, offsets: torch.Tensor) -> torch.Tensor:
        """The visual block's slots that a pruned block keeps, (B, Vk) with Vk = images of the fullest sample * k.

        offsets: (N, k) the kept visual tokens of each image (indices into its v, ascending). Each sample's images
        keep their order; its slots past them are empty slots of this block (a sample with fewer images has
        at least as many of those as it needs)."""
        v, k = self.tokens_per_image, offsets.shape[1]
        batch, device = self.visual_positions.shape[0], offsets.device
        images = torch.bincount(self.image_batch_index, minlength=batch)  # (B,)
        column = torch.arange(self.block_size // v * k, device=device)  # (Vk,)
        slots = images[:, None] * v + column - images[:, None] * k  # (B, Vk) empty slots, where no image is kept
        ordinal = self.image_first_slot // v  # (N,)
        slots[self.image_batch_index[:, None], ordinal[:, None] * k + torch.arange(k, device=device)] = (
            self.image_first_slot[:, None] + offsets
        )
        return slots

    def pruned(self, slots: torch.Tensor, k: int) -> "SequenceLayout":
        """This layout with only the visual block's `slots` (B, Vk) from `kept_slots`: k tokens per image, at the
        positions of the kept ones."""
        v = self.tokens_per_image
        return replace(
            self,
            visual_positions=self.visual_positions.gather(1, slots),
            visual_valid=self.visual_valid.gather(1, slots),
            image_first_slot=self.image_first_slot // v * k,
            last_slot_of_placeholder=torch.where(self.is_image, (self.last_slot_of_placeholder + 1) // v * k - 1, 0),
            tokens_per_image=k,
        )


@dataclass
class KeyLayout:
    """What a KV cache holds, per sample: one entry per cached key (owned by `saisa.model.cache.SaisaCache`)."""

    positions: torch.Tensor  # (B, K)
    attendable: torch.Tensor  # (B, K)
    is_visual: torch.Tensor  # (B, K)
    text_column: (
        torch.Tensor
    )  # (K,) the entry holds an input_ids column (text, placeholder, padding), not a visual slot
    next_position: torch.Tensor  # (B,)
    num_input_tokens: int  # input_ids columns consumed so far

    def to(self, device: torch.device) -> "KeyLayout":
        return _to_device(self, device)

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> "KeyLayout":
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(
            none, none.bool(), none.bool(), none[0].bool(), torch.zeros(batch, dtype=torch.long, device=device), 0
        )

    def extend(self, seq: SequenceLayout) -> "KeyLayout":
        """Append a call's keys, in the order they enter the cache: visual block, then text."""
        vis_false = torch.zeros_like(seq.text_attendable)
        columns = torch.ones(seq.text_positions.shape[1], dtype=torch.bool, device=self.text_column.device)
        return KeyLayout(
            positions=torch.cat([self.positions, seq.visual_positions, seq.text_positions], 1),
            attendable=torch.cat([self.attendable, seq.visual_valid, seq.text_attendable], 1),
            is_visual=torch.cat([self.is_visual, seq.visual_valid, vis_false], 1),
            text_column=torch.cat([self.text_column, ~columns.new_ones(seq.block_size), columns]),
            next_position=seq.next_position,
            num_input_tokens=self.num_input_tokens + seq.text_positions.shape[1],
        )

    def select_rows(self, index: torch.Tensor) -> "KeyLayout":
        """Rows `index` (B',) in that order: beam reordering, dropping finished rows."""
        index = index.to(self.positions.device)
        return replace(
            self,
            positions=self.positions[index],
            attendable=self.attendable[index],
            is_visual=self.is_visual[index],
            next_position=self.next_position[index],
        )

    def drop_last_tokens(self, count: int) -> "KeyLayout":
        """Without the last `count` input_ids columns (rejected draft tokens in assisted decoding)."""
        if count == 0:
            return self
        if count > self.num_input_tokens or not bool(self.text_column[-count:].all()):
            raise ValueError(
                f"cannot remove the last {count} tokens: only generated text can be removed from a SAISA "
                "cache, never an image's visual keys"
            )
        removed_positions = self.positions[:, -count:].masked_fill(~self.attendable[:, -count:], 1 << 62)
        next_position = torch.minimum(self.next_position, removed_positions.min(1).values)  # (B,)
        return KeyLayout(
            self.positions[:, :-count],
            self.attendable[:, :-count],
            self.is_visual[:, :-count],
            self.text_column[:-count],
            next_position,
            self.num_input_tokens - count,
        )


def sequence_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    image_token_id: int,
    tokens_per_image: int,
    start_positions: torch.Tensor,
) -> SequenceLayout:
    """input_ids, attention_mask: (B, T); start_positions: (B,) position of the first new token."""
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid
    v = tokens_per_image
    # Each real text token takes one position, each image v, padding none.
    length = torch.where(is_image, v, 1) * valid  # (B, T)
    text_positions = start_positions[:, None] + length.cumsum(1) - length  # (B, T)

    image_batch_index, image_column = is_image.nonzero(as_tuple=True)  # (N,), (N,), row-major = input order
    ordinal = is_image.long().cumsum(1) - 1  # (B, T) index of each image within its sample
    image_first_slot = ordinal[image_batch_index, image_column] * v  # (N,)
    images_per_sample = is_image.sum(1)  # (B,)
    block = int(images_per_sample.max()) * v if input_ids.shape[0] else 0

    batch = input_ids.shape[0]
    offsets = torch.arange(v, device=input_ids.device)
    visual_positions = torch.zeros(batch, block, dtype=torch.long, device=input_ids.device)
    visual_valid = torch.zeros(batch, block, dtype=torch.bool, device=input_ids.device)
    slots = image_first_slot[:, None] + offsets  # (N, v)
    visual_positions[image_batch_index[:, None], slots] = (
        text_positions[image_batch_index, image_column][:, None] + offsets
    )
    visual_valid[image_batch_index[:, None], slots] = True

    last_slot = torch.where(is_image, ordinal * v + v - 1, 0)
    next_position = start_positions + length.sum(1)
    return SequenceLayout(
        text_positions,
        valid & ~is_image,
        is_image,
        visual_positions,
        visual_valid,
        image_batch_index,
        image_first_slot,
        last_slot,
        next_position,
        v,
    )


def attention_mask_4d(
    *,
    query_positions: torch.Tensor,
    query_is_visual: torch.Tensor,
    keys: KeyLayout,
    first_query_key: int,
    no_visual_to_visual: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask (B, 1, Q, K) for queries whose own keys are keys[first_query_key : first_query_key + Q].

    query_positions, query_is_visual: (B, Q).
    """
    allowed = keys.attendable[:, None, :] & (keys.positions[:, None, :] <= query_positions[:, :, None])  # (B, Q, K)
    if no_visual_to_visual:
        allowed &= ~(query_is_visual[:, :, None] & keys.is_visual[:, None, :])
    # Every query sees itself: a visual token under NAAViT, and inert queries (padding, placeholders), whose outputs are
    # discarded but must not be a softmax over nothing.
    num_queries = query_positions.shape[1]
    own_key = torch.arange(num_queries, device=allowed.device) + first_query_key
    allowed[:, torch.arange(num_queries, device=allowed.device), own_key] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
