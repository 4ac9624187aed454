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
    "evaluate",
    "exact_match",
    "extract_choice",
    "generate_answers",
    "load_questions",
    "normalize_answer",
    "pope_metrics",
    "read_questions",
    "vqa_accuracy",
    "yes_no",
]
