"""Run under torchrun (2 CPU ranks, gloo) by tests/test_fsdp2.py: FSDP2 `fully_shard` on every decoder layer of the
LLM, then on the root, trains a tiny SAISA model; each rank checks the loss of every step and the final full weights
against the same model trained unsharded on the whole batch in this process."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import IMAGE_TOKEN, images, tiny_model
from torch.distributed.fsdp import fully_shard

STEPS = 3


def batch(text_only_rank: bool):
    """4 samples of different lengths and image counts; labels on the text after the images. With
    `text_only_rank`, the second rank's two samples hold no image: its visual weights must still take part."""
    g = torch.Generator().manual_seed(0)
    rows = [
        [3, IMAGE_TOKEN, 6, 7, 8, 9, 10, 11],
        [3, 6, IMAGE_TOKEN, 7, 8, IMAGE_TOKEN, 9, 10],
        [3, 6, 7, 8, 9, 10, 11, 12],
        [3, 6, 7, 8, 0, 0, 0, 0] if text_only_rank else [IMAGE_TOKEN, 6, 7, 8, 0, 0, 0, 0],
    ]
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    labels = torch.randint(3, 100, ids.shape, generator=g).masked_fill(mask == 0, -100)
    return ids, mask, labels, images(int((ids == IMAGE_TOKEN).sum()), seed=2)


def train(model, rows: slice, text_only_rank: bool) -> list[float]:
    """STEPS AdamW steps on `rows` of the batch; returns each step's loss over the whole batch."""
    ids, mask, labels, pixels = batch(text_only_rank)
    first_image = int((ids[: rows.start or 0] == IMAGE_TOKEN).sum())
    n_images = int((ids[rows] == IMAGE_TOKEN).sum())
    step_labels = (model.loss_labels(ids, mask, labels) != -100).sum()  # the whole step's, all ranks (Trainer's rule)
    sharded = dist.is_initialized() and rows != slice(None)
    # The vision tower stays frozen as in both training stages (its key biases get only rounding noise, which Adam
    # would blow up into lr-sized steps).
    model.vision_tower.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(STEPS):
        out = model(
            input_ids=ids[rows],
            attention_mask=mask[rows],
            labels=labels[rows],
            pixel_values=pixels[first_image : first_image + n_images] if n_images else None,
            num_items_in_batch=step_labels,
        )
        # FSDP averages gradients over ranks; each rank's loss is its share of the step's sum (as in the Trainer).
        (out.loss * (dist.get_world_size() if sharded else 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.detach()
        if sharded:
            dist.all_reduce(loss)
        losses.append(float(loss))
    return losses


def main(checkpointing: bool, text_only_rank: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = tiny_model("saisa").train()
    sharded = tiny_model("saisa").train()
    if checkpointing:
        for model in (reference, sharded):
            model.gradient_checkpointing_enable({"use_reentrant": False})
    want = train(reference, slice(None), text_only_rank)

    for layer in sharded.language_model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    got = train(sharded, slice(2 * rank, 2 * rank + 2), text_only_rank)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.state_dict().items()}
    for key, value in reference.state_dict().items():
        # 3 AdamW steps of lr 1e-3 move a weight by up to 3e-3; fp32 reduction order, which Adam's 1/sqrt(v) magnifies
        # for elements with tiny gradients, by up to about 6e-6.
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-5, msg=key)
    print(f"rank {rank}: losses {got} match unsharded {want}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(checkpointing="--checkpointing" in sys.argv, text_only_rank="--text-only-rank" in sys.argv)
