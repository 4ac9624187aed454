"""Question formats, one file each, registered by name (`register_format`); `evaluate` offers each row to them in
registration order. A new format is one file: a `QuestionFormat` subclass and a `register_format` call."""

from saisa.evaluation.formats import multiple_choice, short_answer, yes_no  # noqa: F401 (each registers its format)
from saisa.evaluation.formats.base import FORMATS, QuestionFormat, format_of, register_format

__all__ = ["FORMATS", "QuestionFormat", "format_of", "register_format"]
