"""Yes/no questions (POPE): `text` + `label` ("yes" / "no"); answers parsed and scored as the official POPE script
does, and the run's metrics gain POPE's own under "pope"."""

from __future__ import annotations

from saisa.evaluation.formats.base import QuestionFormat, is_text, register_format
from saisa.evaluation.metrics import pope_metrics, yes_no


class YesNo(QuestionFormat):
    name = "yes_no"

    def claims(self, row: dict) -> bool:
        label = row.get("label")
        return "options" not in row and isinstance(label, str) and label.lower() in ("yes", "no")

    def problem(self, row: dict) -> str | None:
        return None if is_text(row.get("text")) else "text (the question) is missing or not a string"

    def score(self, row: dict, prediction: str) -> dict:
        said, label = yes_no(prediction), row["label"].lower()
        return {"extracted": said, "label": label, "correct": float(said == label)}

    def summary(self, records: list[dict]) -> dict:
        return {"pope": pope_metrics([r["extracted"] for r in records], [r["label"] for r in records])}


register_format(YesNo())
