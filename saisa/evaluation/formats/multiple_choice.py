"""Multiple choice (MMBench / SEED / ScienceQA style): `question` (or `text`) + `options` ({"A": ..} or a list of at
most 26, lettered A-Z) + `answer` (a letter); the answer's letter is extracted and compared."""

from __future__ import annotations

import string

from saisa.evaluation.formats.base import QuestionFormat, is_text, register_format
from saisa.evaluation.metrics import extract_choice

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def options(row: dict) -> dict[str, str]:
    """letter -> option text."""
    given = row["options"]
    return dict(zip(string.ascii_uppercase, given, strict=False)) if isinstance(given, list) else dict(given)


class MultipleChoice(QuestionFormat):
    name = "multiple_choice"

    def claims(self, row: dict) -> bool:
        return "options" in row

    def problem(self, row: dict) -> str | None:
        given = row["options"]
        texts = list(given.values()) if isinstance(given, dict) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return "options must be a non-empty list or object of strings"
        if isinstance(given, list) and len(given) > len(string.ascii_uppercase):
            return f"{len(given)} options in a list, but only 26 can be lettered A-Z"
        if not is_text(row.get("question", row.get("text"))):
            return "a multiple-choice row needs a string question (or text)"
        if row.get("answer") not in options(row):
            return f"answer must be one of the option letters {sorted(options(row))}, got {row.get('answer')!r}"
        return None

    def prompt(self, row: dict) -> str:
        lines = [row.get("question", row.get("text", ""))] + [f"{k}. {v}" for k, v in options(row).items()]
        return "\n".join(lines + [INSTRUCTION])

    def score(self, row: dict, prediction: str) -> dict:
        choice = extract_choice(prediction, options(row))
        return {"extracted": choice, "correct": float(choice == row["answer"])}


register_format(MultipleChoice())
