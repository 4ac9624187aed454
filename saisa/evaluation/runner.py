"""Batched evaluation of a model on a LLaVA-style question JSONL with an image folder.

One question per line (UTF-8, lines end at '\n' only, a leading BOM accepted), with `question_id`, `image` (optional:
a file name inside the image folder) and the fields of its format (`saisa.evaluation.formats`: short answer, multiple
choice, yes/no, and any registered with `register_format`), which also says how it is asked and scored.
Every row is scored on its own (question ids may be missing or repeated). A row that cannot be read or asked (invalid
UTF-8 or JSON, not a JSON object, a missing or mistyped field, an empty image name, an image path leaving the image
folder, the image placeholder in its text, a prompt longer than the model) is reported with its file:line and reason
and skipped; a question whose image is missing or unreadable, or whose generation fails, is written to the
predictions with its error. The run goes on either way and the metrics count each kind.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from saisa.evaluation.formats import FORMATS, format_of
from saisa.inference.generation import answer_batch, user_prompt
from saisa.processing import open_image

logger = logging.getLogger(__name__)


@dataclass
class Question:
    row: dict
    where: str  # "file:line"
    line: int


@dataclass
class Skipped:
    where: str
    line: int
    reason: str
    unreadable: bool = False  # not valid UTF-8 or JSON (as opposed to a readable row that cannot be asked)

    def record(self) -> dict:
        return {"where": self.where, "reason": self.reason}


def read_questions(path: str | Path, *, allow_external_images: bool = False) -> tuple[list[Question], list[Skipped]]:
    """The usable rows of a question JSONL, and the others with their file:line and what is wrong with them.

    Lines are split at '\n' alone (JSON Lines): `str.splitlines` would also split at U+2028, U+0085 and others that a
    JSON string may hold raw, losing the row and shifting every later line number. Each line is decoded on its own, so
    one bad byte costs its row only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # as editors on Windows save UTF-8
        data = data[len(codecs.BOM_UTF8) :]
    questions, skipped = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            reason = f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line)"
            skipped.append(Skipped(where, number, reason, unreadable=True))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            reason = f"not valid JSON ({getattr(error, 'msg', 'nested too deeply')})"
            skipped.append(Skipped(where, number, reason, unreadable=True))
            continue
        reason = row_problem(row, allow_external_images=allow_external_images)
        if reason:
            skipped.append(Skipped(where, number, reason))
        else:
            questions.append(Question(row, where, number))
    return questions, skipped


def load_questions(path: str | Path, *, allow_external_images: bool = False) -> list[dict]:
    """The usable rows of a question JSONL (`read_questions` also says why the others are not)."""
    return [question.row for question in read_questions(path, allow_external_images=allow_external_images)[0]]


def image_problem(image, *, allow_external_images: bool = False) -> str | None:
    """Why a row's `image` cannot name its image, or None. Absent or null: a text-only question. Judged on the name
    alone (no file system access), so a folder's own symlinks stay usable."""
    if image is None:
        return None
    if not isinstance(image, str):
        return f"image must be a file name, got {type(image).__name__}"
    if not image.strip():
        return "image is an empty file name (leave the key out, or null, for a text-only question)"
    if allow_external_images:
        return None
    if os.path.isabs(image):
        return f"image {image!r} is an absolute path, outside the image folder (--allow-external-images allows it)"
    if os.path.normpath(image).split(os.sep)[0] == os.pardir:
        return f"image {image!r} leaves the image folder (--allow-external-images allows it)"
    return None


def row_problem(row, *, allow_external_images: bool = False) -> str | None:
    """Why a row cannot be asked and scored, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    problem = image_problem(row.get("image"), allow_external_images=allow_external_images)
    if problem:
        return problem
    return format_of(row).problem(row)


def score(row: dict, prediction: str) -> dict:
    """What the record of one answered row holds: its verdict and what it was judged against."""
    return format_of(row).score(row, prediction)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prompt_problem(model, processor, row: dict, n_images: int, max_new_tokens: int) -> str | None:
    """A question whose text holds the image placeholder, or whose prompt cannot fit the model, cannot be asked."""
    text = format_of(row).prompt(row)
    if processor.image_token in text:
        return f"the question holds {processor.image_token!r}, the model's image placeholder"
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    if limit is None:
        return None
    prompt = user_prompt(processor, text, n_images)
    positions = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    positions += n_images * (model.tokens_per_image - 1)
    if positions + max_new_tokens > limit:
        return f"the prompt takes {positions} positions + {max_new_tokens} new tokens, over the model's {limit}"
    return None


def generate_answers(
    model,
    processor,
    questions: list[Question],
    image_folder: str | Path | None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    blind: bool = False,
    desc: str = "eval",
) -> tuple[list[dict], list[Skipped]]:
    """One record per question (prediction or error, and score), and the questions that could not be asked."""
    folder = Path(image_folder) if image_folder else Path(".")
    prepared, records, skipped = [], [], []
    for question in questions:
        row, image = question.row, None
        uses_image = bool(row.get("image")) and not blind
        problem = _prompt_problem(model, processor, row, int(uses_image), max_new_tokens)
        if problem:
            skipped.append(Skipped(question.where, question.line, problem))
            continue
        if uses_image:
            try:
                image = open_image(folder / row["image"])
            except (FileNotFoundError, ValueError) as error:
                records.append(_record(question, error=f"image: {error}"))
                continue
        prepared.append((question, image))
    for batch in tqdm(list(_batches(prepared, batch_size)), desc=desc, unit="batch"):
        records += _answer(model, processor, batch, max_new_tokens)
    return records, skipped


def _answer(model, processor, batch: list, max_new_tokens: int) -> list[dict]:
    """Records for a batch; if the batch fails, its questions are asked one at a time so only the faulty one fails."""
    try:
        texts = answer_batch(
            model,
            processor,
            [format_of(question.row).prompt(question.row) for question, _ in batch],
            [[image] if image is not None else [] for _, image in batch],
            max_new_tokens=max_new_tokens,
        )
    except Exception as error:  # noqa: BLE001 (any failure becomes that question's error; the run goes on)
        if len(batch) > 1:
            return [record for item in batch for record in _answer(model, processor, [item], max_new_tokens)]
        return [_record(batch[0][0], error=f"generation: {type(error).__name__}: {error}")]
    records = []
    for (question, _), text in zip(batch, texts, strict=True):
        text = text.strip()
        records.append(_record(question, prediction=text, **score(question.row, text)))
    return records


def _record(question: Question, *, prediction: str | None = None, error: str | None = None, **verdict) -> dict:
    record = {
        "question_id": question.row.get("question_id"),
        "where": question.where,
        "kind": format_of(question.row).name,
        "prediction": prediction,
        "correct": 0.0,
        **verdict,
    }
    if error is not None:
        record["error"] = error
    return record


def summarize(records: list[dict], skipped: list[Skipped]) -> dict:
    """Metrics from the records alone: each carries its own verdict (and what its format's summary reads)."""
    answered = [r for r in records if "error" not in r]
    metrics = {
        "questions": len(records) + len(skipped),
        "answered": len(answered),
        "skipped": len(skipped),
        "unreadable": sum(item.unreadable for item in skipped),  # of the skipped: not valid UTF-8 or JSON
        "missing_images": sum(r.get("error", "").startswith("image:") for r in records),
        "failed": sum(r.get("error", "").startswith("generation:") for r in records),
        "accuracy": sum(r["correct"] for r in answered) / len(answered) if answered else 0.0,
    }
    for name, question_format in FORMATS.items():
        own = [r for r in answered if r["kind"] == name]
        if own:
            metrics.update(question_format.summary(own))
    return metrics


def evaluate(
    model,
    processor,
    questions: str | Path,
    image_folder: str | Path | None,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    blind: bool = False,
    allow_external_images: bool = False,
) -> dict:
    """Answer and score a question file; writes predictions.jsonl, skipped.jsonl and metrics.json to `out_dir`.
    Image paths must stay inside `image_folder` unless `allow_external_images`."""
    usable, skipped = read_questions(questions, allow_external_images=allow_external_images)
    records, unasked = generate_answers(
        model,
        processor,
        usable,
        image_folder,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        blind=blind,
        desc="blind" if blind else "eval",
    )
    skipped = sorted(skipped + unasked, key=lambda item: item.line)
    for item in skipped:
        logger.warning("skipped %s: %s", item.where, item.reason)
    metrics = summarize(records, skipped)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = "blind_" if blind else ""
        (out / f"{tag}predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{tag}skipped.jsonl").write_text("".join(json.dumps(s.record()) + "\n" for s in skipped))
        (out / f"{tag}metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
