from saisa.evaluation.metrics import exact_match, extract_choice, normalize_answer, pope_metrics, yes_no
from saisa.evaluation.runner import evaluate, generate_answers, load_questions

__all__ = [
    "evaluate",
    "exact_match",
    "extract_choice",
    "generate_answers",
    "load_questions",
    "normalize_answer",
    "pope_metrics",
    "yes_no",
]
