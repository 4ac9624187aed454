"""LLaVA-format training data: a JSON list of `{"id", "image" | "images", "video" | "videos", "conversations": [...]}`,
images read lazily from a folder. Samples may have no image, one, or several (`"image": [..]` or `"images": [..]`, one
`<image>` each), and videos as their frames' files (`"video": [frame, ..]` or `"videos": [[frame, ..], ..]`, one
`<video>` each). Each image or video takes one position block per view (`saisa.processing.views`: tiles, frames)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from saisa.processing import SaisaProcessor, open_image
from saisa.processing.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    get_template,
    tokenize_with_labels,
    turn_role,
    turn_text,
)
from saisa.processing.views import NUM_FRAMES, frame_indices, repeat_placeholders

logger = logging.getLogger(__name__)


TRUNCATED, BAD_IMAGE = 1, 2  # DataStats flags


@dataclass
class DataStats:
    """Kept per record index of the file, so a sample met again in a later epoch counts once. The per-sample flags
    sit in shared memory: data-loader workers (copies of the dataset) set them, the main process counts them."""

    flags: torch.Tensor  # (records in the file,) uint8 TRUNCATED | BAD_IMAGE
    skipped_records: dict[int, str] = field(default_factory=dict)  # record index -> what is wrong (found at load)

    @classmethod
    def for_records(cls, count: int) -> DataStats:
        return cls(torch.zeros(count, dtype=torch.uint8).share_memory_())

    @property
    def truncated_records(self) -> set[int]:
        return set((self.flags & TRUNCATED).nonzero().flatten().tolist())

    @property
    def skipped_images(self) -> list[int]:
        return (self.flags & BAD_IMAGE).nonzero().flatten().tolist()

    @property
    def truncated(self) -> int:
        return len(self.truncated_records)

    @property
    def skipped(self) -> int:
        return len(self.skipped_images) + len(self.skipped_records)


class LlavaJsonDataset(Dataset):
    """Records are checked when the file is loaded (no tokenisation, no image reads), so broken data fails before
    training starts; with `skip_bad_images`, broken records and samples whose images cannot be read are skipped."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: SaisaProcessor,
        *,
        template: str,
        tokens_per_image: int,
        max_length: int = 2048,
        skip_bad_images: bool = False,
        allow_external_images: bool = False,
        num_frames: int = NUM_FRAMES,
    ):
        self.path = Path(json_path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"data.max_length must be a positive integer (positions per sample), got {max_length!r}")
        records = _read_records(self.path)
        self.image_folder = Path(image_folder) if image_folder else self.path.parent
        self.processor = processor
        self.template = get_template(template, processor.tokenizer)
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.skip_bad_images = skip_bad_images
        self.allow_external_images = allow_external_images
        self.num_frames = num_frames
        self._wrapping: int | None = None  # bytes a template wraps one turn in, measured on first use
        self.stats = DataStats.for_records(len(records))
        self.records, self.record_indices = [], []  # usable records, and their indices in the file
        missing = []  # (record index, path) of images not on disk, found in one pass before training
        unlearnable = []  # record indices whose labels truncation removes entirely
        images_seen = False
        for index, record in enumerate(records):
            problem = _record_problem(record) or self._image_path_problem(record)
            paths = [] if problem else [self.image_folder / name for name in _file_names(record)]
            if paths and not images_seen:  # data with images: max_length must hold one (checked once)
                self._check_max_length_fits_an_image()
                images_seen = True
            absent = [path for path in paths if not path.is_file()]
            if absent:
                missing.append((index, absent[0]))
                problem = f"image not found: {absent[0]}"
            elif problem is None and not self._keeps_a_label(record, index):
                unlearnable.append(index)
                problem = f"no answer token survives truncation to data.max_length={max_length}"
            if problem is None:
                self.records.append(record)
                self.record_indices.append(index)
            elif skip_bad_images:
                self.stats.skipped_records[index] = problem
            elif not absent and unlearnable[-1:] != [index]:  # missing and unlearnable ones are reported together
                raise ValueError(f"{self._where(index, record)}: {problem}")
        if missing and not skip_bad_images:
            first = "; ".join(f"{self._where(i, records[i])}: {name}" for i, name in missing[:5])
            raise FileNotFoundError(
                f"{len(missing)} of {len(records)} samples name an image that is not in {self.image_folder}; "
                f"the first: {first} (or set data.skip_bad_images: true to skip them)"
            )
        if unlearnable and not skip_bad_images:
            first = "; ".join(self._where(i, records[i]) for i in unlearnable[:5])
            raise ValueError(
                f"{len(unlearnable)} of {len(records)} samples keep no answer token after truncation to "
                f"data.max_length={max_length}, so they would train on nothing (loss 0); the first: {first}. "
                "Raise data.max_length, shorten those samples, or set data.skip_bad_images: true to skip them"
            )
        if self.stats.skipped_records:
            index, problem = next(iter(self.stats.skipped_records.items()))
            logger.warning(
                "skipping %d broken record(s), the first: %s: %s",
                len(self.stats.skipped_records),
                self._where(index, records[index]),
                problem,
            )
        if not self.records:
            raise ValueError(f"{self.path}: none of its {len(records)} records is usable")
        if not any(
            turn_role(t) == "assistant" and turn_text(t).strip() for r in self.records for t in r["conversations"]
        ):
            raise ValueError(
                f"{self.path}: no record has an assistant turn with text: nothing to learn "
                "(every sample's loss would be 0)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def _image_path_problem(self, record: dict) -> str | None:
        """Image names stay inside the image folder (no absolute paths, no `..` out of it) unless the recipe allows
        external ones: a data file must not make training read arbitrary files."""
        if self.allow_external_images:
            return None
        for name in _file_names(record):
            if Path(name).is_absolute() or ".." in Path(os.path.normpath(name)).parts:
                return (
                    f"image path {name!r} leaves the image folder {self.image_folder} (absolute or `..`); "
                    "set data.allow_external_images: true to allow it"
                )
        return None

    def _positions_to_first_label(self, record: dict, widths: list[int]) -> int | None:
        """Positions up to and including the first answer token (each image or video counts its `widths` entry), or
        None when the record has no answer token at all."""
        rendered = self.template.render(_videos_as_images(record["conversations"]))
        ids, labels = tokenize_with_labels(rendered, self.processor.tokenizer, ignore_index=IGNORE_INDEX)
        widths = iter(widths)
        positions = 0
        for token, label in zip(ids, labels, strict=True):
            positions += next(widths) if token == self.processor.image_token_id else 1
            if label != IGNORE_INDEX:
                return positions
        return None

    def _views_at_least(self, kind: str, item) -> int:
        """A video's kept frames; an image's one view (more if tiled, known only from its header)."""
        return len(frame_indices(len(item), self.num_frames)) if kind == "video" else 1

    def _item_widths(self, record: dict) -> list[int]:
        """Positions each image or video of the record takes, in the conversation's order (views known from image
        headers)."""
        widths = []
        for kind, item in _visual_items(record):
            if kind == "video" or self.processor.image_grid_pinpoints is None:
                views = self._views_at_least(kind, item)
            else:
                try:
                    views = self.processor.num_views(open_image(self.image_folder / item, header_only=True))
                except (FileNotFoundError, ValueError):  # refused when the sample is read (or skipped)
                    views = 1
            widths.append(views * self.tokens_per_image)
        return widths

    def _keeps_a_label(self, record: dict, index: int) -> bool:
        """Whether an answer token survives truncation. Tokenised only when it might not: before the first answer a
        record has at most one token per UTF-8 byte of its text, its images, and per turn at most the template's
        wrapping (measured once, system prompt included), so short records are cleared without rendering them."""
        turns = record["conversations"]
        first_answer = next((i for i, turn in enumerate(turns) if turn_role(turn) == "assistant"), None)
        if first_answer is None:
            return True  # no answer at all: the dataset-wide check handles "nothing to learn"
        text = "".join(turn_text(turn) for turn in turns[:first_answer])
        wrapping = (first_answer + 1) * self._turn_wrapping_bytes()
        items = text.count(IMAGE_TOKEN) + text.count(VIDEO_TOKEN)
        most = self.processor.max_views(self.num_frames) * self.tokens_per_image  # the most one item can take
        if wrapping + len(text.encode()) + items * most + 16 < self.max_length:
            return True
        try:
            first = self._positions_to_first_label(record, self._item_widths(record))
        except ValueError as error:  # a template that does not tokenise as rendered
            raise ValueError(f"{self._where(index, record)}: {error}") from None
        return first is None or first <= self.max_length

    def _turn_wrapping_bytes(self) -> int:
        """Bytes the template adds before a one-turn conversation's answer (its system prompt, the turn's markers)."""
        if self._wrapping is None:
            probe = [{"from": "human", "value": "x"}, {"from": "gpt", "value": "a"}]
            rendered = self.template.render(probe)
            self._wrapping = len(rendered.text[: rendered.assistant_spans[0][0]].encode())
        return self._wrapping

    def _check_max_length_fits_an_image(self) -> None:
        """data.max_length must hold one image, the template around it and a one-token answer."""
        probe = {"conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": "a"}]}
        try:
            needed = self._positions_to_first_label(probe, [self.tokens_per_image]) or self.tokens_per_image + 1
        except ValueError:  # a tokenizer that cannot label the probe answer: the image alone is the bound
            needed = self.tokens_per_image + 1
        if self.max_length < needed:
            raise ValueError(
                f"data.max_length={self.max_length} is shorter than one image ({self.tokens_per_image} positions) "
                f"plus the template and a one-token answer: at least {needed} positions are needed"
            )

    @property
    def lengths(self) -> list[int]:
        """Cheap length estimates (no tokenisation, no image reads) for length-grouped batching."""
        return [
            sum(len(turn_text(t)) for t in r["conversations"]) // 4
            + sum(self._views_at_least(kind, item) for kind, item in _visual_items(r)) * self.tokens_per_image
            for r in self.records
        ]

    def _where(self, record_index: int, record) -> str:
        has_id = isinstance(record, dict) and "id" in record
        return f"{self.path}: record {record_index}" + (f", sample {record['id']}" if has_id else "")

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self)):  # with skip_bad_images, a sample with a bad image hands over to the next one
            position = (index + attempt) % len(self)
            record, record_index = self.records[position], self.record_indices[position]
            try:
                views = [
                    self.processor.views(open_image(self.image_folder / item))
                    if kind == "image"
                    else self.processor.views([self.image_folder / name for name in item], kind, self.num_frames)
                    for kind, item in _visual_items(record)
                ]
            except (FileNotFoundError, ValueError) as error:
                where = self._where(record_index, record)
                if not self.skip_bad_images:
                    raise type(error)(f"{where}: {error}") from None
                if not self.stats.flags[record_index] & BAD_IMAGE:  # later epochs meet it again: count and warn once
                    self.stats.flags[record_index] |= BAD_IMAGE
                    logger.warning("skipping %s: %s", where, error)
                continue
            return self._sample(record, record_index, views)
        raise ValueError(f"{self.path}: every usable record has a missing or unreadable image")

    def _sample(self, record: dict, record_index: int, views: list[list]) -> dict:
        """views: per image or video of the record, in order, its views (one `<image>` placeholder each)."""
        rendered = self.template.render(_videos_as_images(record["conversations"]))
        ids, labels = tokenize_with_labels(rendered, self.processor.tokenizer, ignore_index=IGNORE_INDEX)
        kept_ids, kept_labels, kept_items = self._truncate(ids, labels, [len(v) for v in views])
        if len(kept_ids) < len(ids):
            self.stats.flags[record_index] |= TRUNCATED
        counts = [len(item) for item in views[:kept_items]]
        ids, labels = repeat_placeholders(kept_ids, self.processor.image_token_id, counts, kept_labels)
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if kept_items:
            sample["pixel_values"] = self.processor.preprocess_images([v for item in views[:kept_items] for v in item])
        return sample

    def _truncate(self, ids: list[int], labels: list[int], views: list[int]):
        """Cut at `max_length` positions (an image or video counts v per view); one that no longer fits is dropped
        whole. views: per item, its views. Returns the kept ids, labels and how many items are kept."""
        image_id = self.processor.image_token_id
        positions, cut, kept = 0, len(ids), 0
        for i, token in enumerate(ids):
            width = self.tokens_per_image * views[kept] if token == image_id and kept < len(views) else 1
            if positions + width > self.max_length:
                cut = i
                break
            positions += width
            kept += token == image_id
        return ids[:cut], labels[:cut], min(kept, len(views))


def _read_records(path: Path) -> list:
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    try:
        records = json.loads(path.read_bytes())  # bytes: UTF-8/16/32 detected by json, not the locale's encoding
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of LLaVA records")
    if not records:
        raise ValueError(f"{path}: the list of records is empty")
    return records


def _record_problem(record) -> str | None:
    """What makes a record unusable, or None."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {_json_snippet(record)}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return f"`conversations` must be a non-empty list of turns, got {_json_snippet(turns)}"
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {number} must be a JSON object, got {_json_snippet(turn)}"
        try:
            role = turn_role(turn)
        except ValueError as error:
            return f"turn {number}: {error}"
        if role == "system" and number > 0:
            return f"turn {number}: a system turn may only come first"
        if not isinstance(turn_text(turn), str):
            return f"turn {number}: `value` must be a string, got {_json_snippet(turn_text(turn))}"
    names = record.get("images", record.get("image", []))
    if not isinstance(names, (str, list)) or not all(isinstance(name, str) for name in _image_names(record)):
        return f"`image`/`images` must be a file name or a list of them, got {_json_snippet(names)}"
    videos = _videos(record)
    if not all(isinstance(v, list) and v and all(isinstance(name, str) for name in v) for v in videos):
        return (
            "`video` must be a non-empty list of frame file names (`videos`: a list of such lists), got "
            f"{_json_snippet(record.get('videos', record.get('video')))}"
        )
    placeholders = sum(turn_text(t).count(IMAGE_TOKEN) for t in turns)
    if placeholders != len(_image_names(record)):
        return f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(_image_names(record))} image(s)"
    placeholders = sum(turn_text(t).count(VIDEO_TOKEN) for t in turns)
    if placeholders != len(videos):
        return f"{placeholders} {VIDEO_TOKEN} placeholder(s) but {len(videos)} video(s)"
    return None


def _json_snippet(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _image_names(record: dict) -> list[str]:
    names = record.get("images", record.get("image", []))
    return [names] if isinstance(names, str) else list(names)


def _videos(record: dict) -> list:
    """The record's videos, each a list of frame file names (`"video": [frames]` is one video)."""
    if "videos" in record:
        return record["videos"] if isinstance(record["videos"], list) else [record["videos"]]
    return [record["video"]] if "video" in record else []


def _file_names(record: dict) -> list[str]:
    return _image_names(record) + [name for video in _videos(record) for name in video]


def _visual_items(record: dict) -> list[tuple[str, object]]:
    """("image", file name) and ("video", [frame file names]) in the order their placeholders come."""
    images, videos = iter(_image_names(record)), iter(_videos(record))
    tokens = {IMAGE_TOKEN: ("image", images), VIDEO_TOKEN: ("video", videos)}
    text = "".join(turn_text(turn) for turn in record["conversations"])
    found = re.findall(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}", text)
    return [(tokens[token][0], next(tokens[token][1])) for token in found]


def _videos_as_images(turns: list[dict]) -> list[dict]:
    """The turns with each `<video>` written `<image>`: one placeholder token per item, expanded per view later."""
    written = []
    for turn in turns:
        key = "value" if "value" in turn else "content"
        written.append({**turn, key: turn_text(turn).replace(VIDEO_TOKEN, IMAGE_TOKEN)})
    return written


@dataclass
class Collator:
    """Right-pads a batch for training; images of all samples concatenated in order.

    `loss_labels` (the model's `loss_labels`) masks the labels no query predicts, so the Trainer's label count for
    `num_items_in_batch` equals the loss's own count.
    """

    pad_token_id: int
    loss_labels: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = sample["input_ids"], sample["labels"], 1
        if self.loss_labels is not None:
            labels = self.loss_labels(ids, mask, labels)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch
