"""LLaVA-format training data: a JSON list of `{"id", "image" | "images", "conversations": [...]}`, images read lazily
from a folder. Samples may have no image, one, or several (`"image": [..]` or `"images": [..]`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from saisa.data.templates import IMAGE, get_template, tokenize_with_labels
from saisa.processing import SaisaProcessor, load_image

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class DataStats:
    truncated: int = 0
    skipped_images: list[str] = field(default_factory=list)


class LlavaJsonDataset(Dataset):
    def __init__(self, json_path: str | Path, image_folder: str | Path | None, processor: SaisaProcessor, *,
                 template: str, tokens_per_image: int, max_length: int = 2048, skip_bad_images: bool = False):
        path = Path(json_path)
        if not path.exists():
            raise FileNotFoundError(f"training data not found: {path}")
        self.records = json.loads(path.read_text())
        if not isinstance(self.records, list):
            raise ValueError(f"{path} must hold a JSON list of LLaVA records")
        self.image_folder = Path(image_folder) if image_folder else path.parent
        self.processor = processor
        self.template = get_template(template, processor.tokenizer)
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.skip_bad_images = skip_bad_images
        self.stats = DataStats()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Cheap length estimates (no tokenisation, no image reads) for length-grouped batching."""
        return [sum(len(_value(t)) for t in r["conversations"]) // 4 + len(_image_names(r)) * self.tokens_per_image
                for r in self.records]

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):  # with skip_bad_images, a bad sample hands over to the next one
            record = self.records[(index + attempt) % len(self)]
            try:
                images = [load_image(self.image_folder / name) for name in _image_names(record)]
            except (FileNotFoundError, ValueError) as error:
                if not self.skip_bad_images:
                    raise type(error)(f"sample {record.get('id', index)}: {error}") from None
                self.stats.skipped_images.append(str(error))
                logger.warning("skipping sample %s: %s (%d skipped so far)", record.get("id", index), error,
                               len(self.stats.skipped_images))
                continue
            return self._sample(record, images, index)
        raise ValueError("every sample has a missing or unreadable image")

    def _sample(self, record: dict, images: list, index: int) -> dict:
        placeholders = sum(_value(t).count(IMAGE) for t in record["conversations"])
        if placeholders != len(images):
            raise ValueError(f"sample {record.get('id', index)}: {placeholders} {IMAGE} placeholder(s) but "
                             f"{len(images)} image(s)")
        rendered = self.template.render(record["conversations"])
        ids, labels = tokenize_with_labels(rendered, self.processor.tokenizer, ignore_index=IGNORE_INDEX)
        ids, labels, kept_images = self._truncate(ids, labels, len(images))
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if kept_images:
            sample["pixel_values"] = self.processor.preprocess_images(images[:kept_images])
        return sample

    def _truncate(self, ids: list[int], labels: list[int], n_images: int):
        """Cut at `max_length` positions (an image counts v); an image that no longer fits is dropped whole."""
        image_id = self.processor.image_token_id
        positions, cut, kept = 0, len(ids), 0
        for i, token in enumerate(ids):
            width = self.tokens_per_image if token == image_id else 1
            if positions + width > self.max_length:
                cut = i
                break
            positions += width
            kept += token == image_id
        if cut < len(ids):
            self.stats.truncated += 1
        return ids[:cut], labels[:cut], min(kept, n_images)


def _value(turn: dict) -> str:
    return turn.get("value", turn.get("content", ""))


def _image_names(record: dict) -> list[str]:
    names = record.get("images", record.get("image", []))
    return [names] if isinstance(names, str) else list(names)


@dataclass
class Collator:
    """Right-pads a batch for training; images of all samples concatenated in order."""

    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = sample["input_ids"], sample["labels"], 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch
