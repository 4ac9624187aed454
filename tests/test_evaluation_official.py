"""Scoring as the official scripts score: POPE's parsing and metrics (RUCAIBox/POPE `evaluate.py`, LLaVA's
`llava/eval/eval_pope.py`) on a table of free-form answers, and the VQA accuracy (GT-Vision-Lab/VQA `vqaEval.py`) on
10-annotator lists, against hand-computed values and a closed form of its leave-one-out mean."""

from __future__ import annotations

import random

import pytest

from saisa.evaluation import exact_match, pope_metrics, vqa_accuracy, yes_no
from saisa.evaluation.runner import score

# Ten typical free-form answers to "Is there a dog in the image?" and what the official rule makes of them: the text
# before the first '.', commas dropped, split on spaces; "no" when a word is exactly "No", "no" or "not", else "yes".
TYPICAL = [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog in the image.", "no"),
    ("There is a dog in the image.", "yes"),  # says neither: yes (the old parser: unparsable, counted as no)
    ("There is no dog in the image.", "no"),
    ("I don't see a dog in the image.", "yes"),  # "don't" is not "not"
    ("The image shows a cat on a couch. There is no dog.", "yes"),  # only the first sentence counts
    ("Not that I can see.", "yes"),  # "Not" is not in the list ("No", "no", "not")
    ("Yes.", "yes"),
    ("No", "no"),
    ("A dog is sitting on the grass.", "yes"),
]
EDGES = [
    ("NO", "yes"),  # case matters: only "No" and "no"
    ("Yes, but there is no cat.", "no"),  # a "no" anywhere in the first sentence wins over a leading "yes"
    ("no,there is none", "yes"),  # the comma is dropped, not replaced: "nothere"
    ("There are 2.5 dogs, no cats", "yes"),  # the first '.' ends the first sentence, even in a number
    ("Is there? No.", "no"),
    ("not at all", "no"),
    ("", "yes"),
    ("no\nthere is none", "yes"),  # split on single spaces: "no\nthere" is one word
]


@pytest.mark.parametrize("answer, expected", TYPICAL + EDGES)
def test_pope_parses_free_form_answers_as_the_official_script(answer, expected):
    assert yes_no(answer) == expected


def test_pope_metrics_on_the_typical_answers():
    labels = ["yes", "no", "yes", "no", "no", "no", "no", "yes", "no", "yes"]
    said = [yes_no(answer) for answer, _ in TYPICAL]
    # by hand from the table: tp = rows 1, 3, 8, 10; fp = 5, 6, 7; tn = 2, 4, 9; fn = none
    metrics = pope_metrics(said, labels)
    assert metrics["yes_ratio"] == pytest.approx(0.7)
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["precision"] == pytest.approx(4 / 7) and metrics["recall"] == pytest.approx(1.0)
    assert metrics["f1"] == pytest.approx(2 * (4 / 7) / (4 / 7 + 1))


def test_pope_metrics_refuse_what_is_not_a_parsed_answer():
    with pytest.raises(ValueError, match="predictions must be 'yes' or 'no'.*None"):
        pope_metrics(["yes", None], ["yes", "no"])
    with pytest.raises(ValueError, match="labels must be 'yes' or 'no'.*'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


def test_pope_metrics_where_the_official_script_divides_by_zero():
    metrics = pope_metrics(["no", "no"], ["no", "no"])
    assert metrics == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_a_pope_row_is_scored_with_the_official_rule():
    row = {"text": "Is there a dog in the image?", "label": "yes"}
    assert score(row, "There is a dog in the image.") == {"extracted": "yes", "label": "yes", "correct": 1.0}


def _agreeing(n: int, answer: str = "cat", other: str = "dog") -> list[str]:
    return [answer] * n + [other] * (10 - n)


# One of ten annotators agreeing: nine of the ten leave-one-out subsets hold it once, 9 * (1/3) / 10 = 0.3; two:
# (2 * 1/3 + 8 * 2/3) / 10 = 0.6; three: (3 * 2/3 + 7 * 1) / 10 = 0.9; four or more: 1.0.
@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("cat", _agreeing(0), 0.0),
        ("cat", _agreeing(1), 0.3),
        ("cat", _agreeing(2), 0.6),
        ("cat", _agreeing(3), 0.9),
        ("cat", _agreeing(4), 1.0),
        ("cat", _agreeing(10), 1.0),
        ("A cat.", _agreeing(2), 0.6),  # the prediction is normalised
        ("Two", _agreeing(1, "2"), 0.3),
        ("two", ["two"] * 10, 0.0),  # identical answers are left as they are; the prediction becomes "2"
        ("Two", ["2"] * 10, 1.0),
        ("dog", _agreeing(5, "Dog", "cat"), 0.0),  # differing answers get punctuation only, never lower case
        ("yes", ["yes."] * 3 + ["yes"] * 7, 1.0),  # ...which drops the period: all ten say "yes"
        ("red white", _agreeing(3, "red/white", "red"), 0.9),  # "/" becomes a space in the answers too
        ("an apple", _agreeing(3, "an apple", "pear"), 0.0),  # articles stay in the answers, not in the prediction
        ("cat", ["cat", "cat"], 1 / 3),  # fewer than ten: the same loop, here at most 1/3
        ("cat", ["cat", "cat", "cat"], 2 / 3),
        ("cat", ["cat"] * 4, 1.0),
        ("cat", ["cat"], 0.0),  # one answer: nobody else to agree
        ("", ["", "cat"], 1 / 6),  # the empty prediction agrees with the one empty answer, left in half the time
    ],
)
def test_vqa_accuracy_as_the_official_evaluation(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def _closed_form(matches: int, n: int) -> float:
    """The leave-one-out mean without the loop: a matching annotator left out leaves matches - 1 agreeing, another
    leaves all of them."""
    return (matches * min(1, (matches - 1) / 3) + (n - matches) * min(1, matches / 3)) / n


def test_vqa_accuracy_against_its_closed_form():
    generator = random.Random(0)
    for _ in range(300):
        n = generator.randint(2, 12)
        answers = [generator.choice(["cat", "dog", "2", "red"]) for _ in range(n)]
        prediction = generator.choice(["cat", "dog", "two", "red", "blue"])
        said = {"two": "2"}.get(prediction, prediction)
        assert vqa_accuracy(prediction, answers) == pytest.approx(_closed_form(answers.count(said), n))


def test_vqa_accuracy_needs_a_list():
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("cat", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("cat", "cat")


def test_exact_match_never_matches_an_empty_answer():
    assert exact_match("", ["", "cat"]) == 0.0
    assert exact_match("the.", "a") == 0.0  # both normalise to nothing
    assert exact_match("The cat.", ["", "cat"]) == 1.0


def test_a_short_answer_row_is_scored_by_its_answer_kind():
    one_of_ten = {"text": "what is this ?", "answer": _agreeing(1)}
    assert score(one_of_ten, "cat") == {"metric": "vqa_accuracy", "correct": pytest.approx(0.3)}
    assert score({"text": "what is this ?", "answer": "Cat"}, "a cat") == {"metric": "exact_match", "correct": 1.0}
