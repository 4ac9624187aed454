"""Answer extraction and metrics in the formats the field uses.

- short answer: the official VQA evaluation's normalisation (punctuation, lower case, number words, articles,
  contractions) then exact match;
- multiple choice (MMBench / SEED / ScienceQA style): the option letter, or the option whose text the answer gives;
- yes/no (POPE): accuracy, precision, recall, F1 and the yes-ratio.
"""

from __future__ import annotations

import re

# The official VQA evaluation's tables (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py),
# as EvalAI scores VQAv2 with them: with straight apostrophes, entries kept as they are (the capitalised ones never
# match, since words are lower-cased first; "somebody'd" maps to "somebodyd").
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
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
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as written there: in effect, a period not followed by a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """The official VQA evaluation's answer processing: tabs and newlines to spaces, then `processPunctuation`
    (each punctuation mark removed where it touches a space or the text holds a digit-comma-digit, else replaced
    by a space; apostrophes and colons kept; periods dropped unless a digit follows), then `processDigitArticle`
    (lower case, number words to digits, articles dropped, missing apostrophes restored)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCT:
        if mark + " " in text or " " + mark in text or _COMMA_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


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
