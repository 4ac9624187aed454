"""What a question format is, and the registry `evaluate` reads formats from."""

from __future__ import annotations

from abc import ABC, abstractmethod

FORMATS: dict[str, QuestionFormat] = {}  # by name, in registration order (the order rows are offered to them)


def is_text(value) -> bool:
    """A non-blank string."""
    return isinstance(value, str) and bool(value.strip())


class QuestionFormat(ABC):
    """One kind of question row: which rows are its own, why a row cannot be asked, the prompt a row asks, and how
    an answer is scored. `evaluate` knows a row only through its format. Subclass it and `register_format` an
    instance to add a format."""

    name: str  # the records' `kind`
    catch_all = False  # the format of the rows no other format claims (one registered format is)

    @abstractmethod
    def claims(self, row: dict) -> bool:
        """Whether `row` (a JSON object) is a question of this format."""

    @abstractmethod
    def problem(self, row: dict) -> str | None:
        """Why this format's `row` cannot be asked and scored, or None."""

    def prompt(self, row: dict) -> str:
        """The question text asked (as one user turn, after the row's image)."""
        return row["text"]

    @abstractmethod
    def score(self, row: dict, prediction: str) -> dict:
        """The verdict on one answer: `correct` (0 to 1, averaged into the run's accuracy) and what it was judged
        against; written into the answer's record."""

    def summary(self, records: list[dict]) -> dict:
        """Metrics beyond accuracy over this format's answered records (each holds its `score` verdict), merged into
        the run's metrics."""
        return {}


def register_format(question_format: QuestionFormat) -> QuestionFormat:
    """Add a format to the registry under its name; rows are offered to formats in registration order."""
    name = question_format.name
    if name in FORMATS:
        raise ValueError(f"a question format named {name!r} is already registered")
    if question_format.catch_all and any(f.catch_all for f in FORMATS.values()):
        raise ValueError(f"{name!r} is a catch-all format, but one is already registered")
    FORMATS[name] = question_format
    return question_format


def format_of(row: dict) -> QuestionFormat:
    """The first registered format that claims `row`, else the catch-all one."""
    for question_format in FORMATS.values():
        if not question_format.catch_all and question_format.claims(row):
            return question_format
    return next(f for f in FORMATS.values() if f.catch_all)
