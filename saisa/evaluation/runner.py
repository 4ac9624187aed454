"""Batched evaluation of a model on a LLaVA-style question JSONL with an image folder.

One question per line (UTF-8, lines end at '\n' only, a leading BOM accepted), with `question_id`, `image` (optional:
a file name inside the image folder) and, by kind:
- short answer: `text` + `answer`: one accepted answer (a string, exact match) or the annotators' answers (a list of
  at least 2, the official VQA accuracy);
- multiple choice: `question` (or `text`) + `options` ({"A": ..} or a list of at most 26) + `answer` (a letter);
- yes/no (POPE): `text` + `label` ("yes" / "no"), answers parsed and scored as the official POPE script does.
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
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from saisa.evaluation.metrics import exact_match, extract_choice, pope_metrics, vqa_accuracy, yes_no
from saisa.generation import answer_batch, user_prompt
from saisa.processing import load_image

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
KINDS = ("short", "multiple_choice", "yes_no")
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


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


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
    kind = question_kind(row)
    if kind == "multiple_choice":
        options = row["options"]
        texts = list(options.values()) if isinstance(options, dict) else options
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return "options must be a non-empty list or object of strings"
        if isinstance(options, list) and len(options) > len(string.ascii_uppercase):
            return f"{len(options)} options in a list, but only 26 can be lettered A-Z"
        if not _is_text(row.get("question", row.get("text"))):
            return "a multiple-choice row needs a string question (or text)"
        if row.get("answer") not in _options(row):
            return f"answer must be one of the option letters {sorted(_options(row))}, got {row.get('answer')!r}"
        return None
    if not _is_text(row.get("text")):
        return "text (the question) is missing or not a string"
    if kind == "yes_no":
        return None
    if "label" in row:
        return f"label must be 'yes' or 'no', got {row['label']!r}"
    answer = row.get("answer")
    if isinstance(answer, list):
        if not all(_is_text(a) for a in answer):
            return "answer: every listed answer must be a non-empty string"
        if len(answer) < 2:
            # VQA accuracy counts the *other* annotators who agree: with one answer there are none, and it is always 0
            return "answer: a list needs 2 or more annotators' answers (one accepted answer is given as a string)"
        return None
    if not _is_text(answer):
        return f"answer must be a string or a list of strings, got {type(answer).__name__}"
    return None


def question_kind(row: dict) -> str:
    if "options" in row:
        return "multiple_choice"
    if isinstance(row.get("label"), str) and row["label"].lower() in ("yes", "no"):
        return "yes_no"
    return "short"


def _options(row: dict) -> dict[str, str]:
    options = row["options"]
    return dict(zip(string.ascii_uppercase, options, strict=False)) if isinstance(options, list) else dict(options)


def prompt_text(row: dict) -> str:
    if question_kind(row) == "multiple_choice":
        lines = [row.get("question", row.get("text", ""))] + [f"{k}. {v}" for k, v in _options(row).items()]
        return "\n".join(lines + [MC_INSTRUCTION])
    return row["text"]


def score(row: dict, prediction: str) -> dict:
    """What the record of one answered row holds: its verdict and what it was judged against."""
    kind = question_kind(row)
    if kind == "multiple_choice":
        choice = extract_choice(prediction, _options(row))
        return {"extracted": choice, "correct": float(choice == row["answer"])}
    if kind == "yes_no":
        said, label = yes_no(prediction), row["label"].lower()
        return {"extracted": said, "label": label, "correct": float(said == label)}
    if isinstance(row["answer"], list):
        return {"metric": "vqa_accuracy", "correct": vqa_accuracy(prediction, row["answer"])}
    return {"metric": "exact_match", "correct": exact_match(prediction, row["answer"])}


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prompt_problem(model, processor, row: dict, n_images: int, max_new_tokens: int) -> str | None:
    """A question whose text holds the image placeholder, or whose prompt cannot fit the model, cannot be asked."""
    text = prompt_text(row)
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
                image = load_image(folder / row["image"])
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
            [prompt_text(question.row) for question, _ in batch],
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
        "kind": question_kind(question.row),
        "prediction": prediction,
        "correct": 0.0,
        **verdict,
    }
    if error is not None:
        record["error"] = error
    return record


def summarize(records: list[dict], skipped: list[Skipped]) -> dict:
    """Metrics from the records alone: each carries its own verdict (and, for yes/no, its label)."""
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
    pope = [r for r in answered if r["kind"] == "yes_no"]
    if pope:
        metrics["pope"] = pope_metrics([r["extracted"] for r in pope], [r["label"] for r in pope])
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
