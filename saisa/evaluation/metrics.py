"""Answer extraction and metrics in the formats the field uses.

- short answer: VQAv2-style normalisation (lower case, punctuation, articles, number words, contractions) then
  exact match;
- multiple choice (MMBench / SEED / ScienceQA style): the option letter, or the option whose text the answer gives;
- yes/no (POPE): accuracy, precision, recall, F1 and the yes-ratio.
"""

from __future__ import annotations

import re

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "thats": "that's",
    "whats": "what's",
}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period that is not a decimal point
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQAv2's answer normalisation (a faithful subset of the official evaluation script)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\3", text)  # 1,000 -> 1000
    text = _PUNCT.sub(" ", text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, answers: str | list[str]) -> float:
    answers = [answers] if isinstance(answers, str) else answers
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


_LETTER = re.compile(r"^\s*\(?([A-Z])[\).:\s]|^\s*\(?([A-Z])\)?\s*$")


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form answer names: a leading letter ("B", "(B)", "B. cat"), else the one option
    whose text appears in the answer. None when it names none or several."""
    match = _LETTER.match(prediction.strip())
    if match:
        letter = match.group(1) or match.group(2)
        if letter in options:
            return letter
    said = normalize_answer(prediction)
    hits = [letter for letter, text in options.items() if normalize_answer(text) and normalize_answer(text) in said]
    return hits[0] if len(hits) == 1 else None


def yes_no(prediction: str) -> str | None:
    words = normalize_answer(prediction).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    has_yes, has_no = "yes" in words, "no" in words or "not" in words
    return "yes" if has_yes and not has_no else "no" if has_no and not has_yes else None


def pope_metrics(predictions: list[str | None], labels: list[str]) -> dict[str, float]:
    """POPE: 'yes' is the positive class; an unparsable answer counts as 'no' (as in the POPE script)."""
    predicted = [p if p in ("yes", "no") else "no" for p in predictions]
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(said == "yes" and truth == "yes" for said, truth in pairs)
    fp = sum(said == "yes" and truth == "no" for said, truth in pairs)
    fn = sum(said == "no" and truth == "yes" for said, truth in pairs)
    tn = sum(said == "no" and truth == "no" for said, truth in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels) if labels else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(labels) if labels else 0.0,
    }
