"""Batched evaluation of a model on a LLaVA-style question JSONL with an image folder.

One question per line, with `question_id`, `image` (optional) and, by kind:
- short answer: `text` + `answer` (a string or a list of accepted answers);
- multiple choice: `question` (or `text`) + `options` ({"A": ..} or a list) + `answer` (a letter);
- yes/no (POPE): `text` + `label` ("yes" / "no").
A question whose image is missing or unreadable is written to the predictions with its error and counted, never
dropped silently.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from saisa.evaluation.metrics import exact_match, extract_choice, pope_metrics, yes_no
from saisa.generation import answer_batch
from saisa.processing import load_image

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
KINDS = ("short", "multiple_choice", "yes_no")


def load_questions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def question_kind(row: dict) -> str:
    if "options" in row:
        return "multiple_choice"
    if str(row.get("label", "")).lower() in ("yes", "no"):
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
    kind = question_kind(row)
    if kind == "multiple_choice":
        choice = extract_choice(prediction, _options(row))
        return {"extracted": choice, "correct": float(choice == row["answer"])}
    if kind == "yes_no":
        said = yes_no(prediction)
        return {"extracted": said, "correct": float(said == row["label"].lower())}
    return {"correct": exact_match(prediction, row["answer"])}


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_answers(
    model,
    processor,
    rows: list[dict],
    image_folder: str | Path | None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    blind: bool = False,
    desc: str = "eval",
) -> list[dict]:
    """One record per row: prediction (or error) and score."""
    folder = Path(image_folder) if image_folder else Path(".")
    prepared, records = [], []
    for row in rows:
        image = None
        if row.get("image") and not blind:
            try:
                image = load_image(folder / row["image"])
            except (FileNotFoundError, ValueError) as error:
                records.append(
                    {"question_id": row.get("question_id"), "prediction": None, "error": str(error), "correct": 0.0}
                )
                continue
        prepared.append((row, image))
    results = []
    for batch in tqdm(list(_batches(prepared, batch_size)), desc=desc, unit="batch"):
        texts = answer_batch(
            model,
            processor,
            [prompt_text(row) for row, _ in batch],
            [[image] if image is not None else [] for _, image in batch],
            max_new_tokens=max_new_tokens,
        )
        for (row, _), text in zip(batch, texts, strict=True):
            text = text.strip()
            results.append(
                {
                    "question_id": row.get("question_id"),
                    "kind": question_kind(row),
                    "prediction": text,
                    **score(row, text),
                }
            )
    return records + results


def summarize(rows: list[dict], records: list[dict]) -> dict:
    answered = [r for r in records if r.get("error") is None]
    metrics = {
        "questions": len(rows),
        "answered": len(answered),
        "missing_images": len(records) - len(answered),
        "accuracy": sum(r["correct"] for r in answered) / len(answered) if answered else 0.0,
    }
    by_id = {r.get("question_id"): r for r in rows}
    pope = [r for r in answered if r.get("kind") == "yes_no"]
    if pope:
        metrics["pope"] = pope_metrics(
            [r["extracted"] for r in pope], [by_id[r["question_id"]]["label"].lower() for r in pope]
        )
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
) -> dict:
    rows = load_questions(questions)
    records = generate_answers(
        model,
        processor,
        rows,
        image_folder,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        blind=blind,
        desc="blind" if blind else "eval",
    )
    metrics = summarize(rows, records)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = "blind_" if blind else ""
        (out / f"{tag}predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{tag}metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
