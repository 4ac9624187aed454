from saisa.evaluation.formats import FORMATS, QuestionFormat, format_of, register_format
from saisa.evaluation.metrics import (
    exact_match,
    extract_choice,
    normalize_answer,
    pope_metrics,
    vqa_accuracy,
    yes_no,
)
from saisa.evaluation.runner import evaluate, generate_answers, load_questions, read_questions

__all__ = [
    "FORMATS",
    "QuestionFormat",
    "evaluate",
    "exact_match",
    "extract_choice",
    "format_of",
    "generate_answers",
    "load_questions",
    "normalize_answer",
    "pope_metrics",
    "read_questions",
    "register_format",
    "vqa_accuracy",
    "yes_no",
]
