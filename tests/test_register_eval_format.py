"""A question format is one file's worth of code: this module defines a new one ("count": integer answers scored by
exact integer match), registers it through the public API and evaluates a question file mixing it with a built-in
format end to end, its metrics checked against answers and scores computed here."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_chat_processor, tiny_model
from PIL import Image

from saisa.evaluation import FORMATS, QuestionFormat, evaluate, format_of, register_format
from saisa.inference.generation import answer_batch

INSTRUCTION = "Answer with a number."


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


class Count(QuestionFormat):
    """`text` + `count` (a non-negative integer); the answer's first integer must equal it."""

    name = "count"

    def claims(self, row: dict) -> bool:
        return "count" in row

    def problem(self, row: dict) -> str | None:
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            return "text (the question) is missing or not a string"
        count = row["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return f"count must be a non-negative integer, got {count!r}"
        return None

    def prompt(self, row: dict) -> str:
        return f"{row['text']} {INSTRUCTION}"

    def score(self, row: dict, prediction: str) -> dict:
        said = first_integer(prediction)
        return {"extracted": said, "correct": float(said == row["count"])}

    def summary(self, records: list[dict]) -> dict:
        return {"count": {"unparsed": sum(r["extracted"] is None for r in records)}}


@pytest.fixture
def count_format():
    registered = register_format(Count())
    yield registered
    del FORMATS[registered.name]


def test_a_format_registered_from_a_test_module_is_evaluated_end_to_end(tmp_path, count_format):
    model, processor = tiny_model("saisa"), tiny_chat_processor()
    Image.new("RGB", (12, 12), (90, 30, 0)).save(tmp_path / "q.png")
    questions = [("what is this ?", "q.png"), ("what ?", None), ("is this what ?", "q.png"), ("this ?", None)]
    # the answers the model gives to each question alone, as evaluate asks it (one user turn, image first)
    said = []
    for text, image in questions:
        images = [Image.open(tmp_path / image).convert("RGB")] if image else []
        answer = answer_batch(model, processor, [f"{text} {INSTRUCTION}"], [images], max_new_tokens=3)[0].strip()
        said.append(first_integer(answer))
    assert any(n is not None for n in said), "the tiny model's answers should hold numbers (its words are w<N>)"
    # rows 0 and 2 hold the count the model will say, rows 1 and 3 another
    counts = [(n if n is not None else 0) + (i % 2) for i, n in enumerate(said)]
    rows = [
        {"question_id": i, "text": text, "count": count, **({"image": image} if image else {})}
        for i, ((text, image), count) in enumerate(zip(questions, counts, strict=True))
    ]
    rows.append({"question_id": "bad", "text": "what ?", "count": "three"})
    rows.append({"question_id": "short", "text": "what is this ?", "answer": "w20"})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert format_of(rows[0]) is count_format and format_of(rows[-1]).name == "short"
    metrics = evaluate(model, processor, path, tmp_path, out_dir=tmp_path / "out", batch_size=1, max_new_tokens=3)

    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["count"] * 4 + ["short"]
    assert [r["extracted"] for r in records[:4]] == said
    expected_correct = [float(n == c) for n, c in zip(said, counts, strict=True)]
    assert [r["correct"] for r in records[:4]] == expected_correct
    assert metrics["questions"] == 6 and metrics["answered"] == 5 and metrics["skipped"] == 1
    assert metrics["accuracy"] == pytest.approx((sum(expected_correct) + records[4]["correct"]) / 5)
    assert metrics["count"] == {"unparsed": sum(n is None for n in said)}
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"where": f"{path}:5", "reason": "count must be a non-negative integer, got 'three'"}]


def test_a_format_name_is_registered_once(count_format):
    with pytest.raises(ValueError, match="already registered"):
        register_format(Count())
