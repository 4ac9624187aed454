"""Short answers: `text` + `answer`, one accepted answer (a string, scored by exact match) or the annotators' answers
(a list of at least 2, scored by the official VQA accuracy). The format of rows no other format claims."""

from __future__ import annotations

from saisa.evaluation.formats.base import QuestionFormat, is_text, register_format
from saisa.evaluation.metrics import exact_match, vqa_accuracy


class ShortAnswer(QuestionFormat):
    name = "short"
    catch_all = True

    def claims(self, row: dict) -> bool:
        return True

    def problem(self, row: dict) -> str | None:
        if not is_text(row.get("text")):
            return "text (the question) is missing or not a string"
        if "label" in row:
            return f"label must be 'yes' or 'no', got {row['label']!r}"
        answer = row.get("answer")
        if isinstance(answer, list):
            if not all(is_text(a) for a in answer):
                return "answer: every listed answer must be a non-empty string"
            if len(answer) < 2:
                # VQA accuracy counts the *other* annotators who agree: with one answer there are none, it is always 0
                return "answer: a list needs 2 or more annotators' answers (one accepted answer is given as a string)"
            return None
        if not is_text(answer):
            return f"answer must be a string or a list of strings, got {type(answer).__name__}"
        return None

    def score(self, row: dict, prediction: str) -> dict:
        if isinstance(row["answer"], list):
            return {"metric": "vqa_accuracy", "correct": vqa_accuracy(prediction, row["answer"])}
        return {"metric": "exact_match", "correct": exact_match(prediction, row["answer"])}


register_format(ShortAnswer())
