"""Answer extraction and metrics in the formats the field uses (what each computes: docs/evaluation.md).

- a list of annotators' answers: the official VQA accuracy (GT-Vision-Lab/VQA `vqaEval.py`), leave-one-out over the
  annotators, with the official normalisation applied where that code applies it;
- one accepted answer: exact match after the same normalisation on both sides;
- multiple choice (MMBench / SEED / ScienceQA style): the option letter, or the option whose text the answer gives;
- yes/no (POPE): the official POPE parsing (first sentence, "no"/"not" rule), then accuracy, precision, recall, F1
  and the yes-ratio as the official POPE script computes them.
"""

from __future__ import annotations

import re

# The official VQA evaluation's tables (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
# at c4e6a0e, its Python 3 version): with straight apostrophes, entries kept as they are (the capitalised ones never
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


def _process_punctuation(text: str) -> str:
    """vqaEval.py's `processPunctuation`: each mark removed where it touches a space (or the text holds a
    digit-comma-digit), else replaced by a space; apostrophes and colons kept; a period dropped unless a digit
    follows."""
    out = text
    for mark in _PUNCT:
        if mark + " " in text or " " + mark in text or _COMMA_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # the official call is `periodStrip.sub("", outText, re.UNICODE)`: the flag (32) lands in `count`
    return _PERIOD.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    """vqaEval.py's `processDigitArticle`: lower case, number words to digits, articles dropped, apostrophes put
    back."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA evaluation's processing of a predicted answer: tabs and newlines to spaces, strip, then
    `processPunctuation` and `processDigitArticle`."""
    return _process_digit_article(_process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy of one answer (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
    `VQAEval.evaluate`, followed step by step):

    - the prediction is normalised (`normalize_answer`);
    - the annotators' answers are left as given when they are all the same string; otherwise each gets
      `processPunctuation` only (not lower case, number words or articles: the dataset's answers come normalised);
    - for each annotator, min(1, #other annotators whose answer equals the prediction / 3); the mean over annotators.

    With 10 answers that is the mean over the 10 choose 9 subsets: one agreeing annotator scores 0.3, two 0.6, three
    0.9, four or more 1.0. Fewer answers are scored by the same loop, as the official code would: n answers never score
    above min(1, (n - 1) / 3), and a single answer always scores 0. Annotators are told apart by position (the official
    code compares answer records, each with its own `answer_id`), so repeated strings each count."""
    if isinstance(answers, str) or not answers:
        raise ValueError("VQA accuracy needs a non-empty list of the annotators' answers")
    said = normalize_answer(prediction)
    truths = list(answers) if len(set(answers)) == 1 else [_process_punctuation(answer) for answer in answers]
    per_annotator = [
        min(1.0, sum(truth == said for other, truth in enumerate(truths) if other != left_out) / 3)
        for left_out in range(len(truths))
    ]
    return sum(per_annotator) / len(per_annotator)


def exact_match(prediction: str, answers: str | list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised accepted answer (both sides through `normalize_answer`;
    this is not the VQA accuracy, which `vqa_accuracy` computes). An answer that normalises to nothing says nothing:
    it never matches, even an empty reference."""
    answers = [answers] if isinstance(answers, str) else answers
    said = normalize_answer(prediction)
    return float(bool(said) and said in {normalize_answer(answer) for answer in answers})


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


def yes_no(prediction: str) -> str:
    """The official POPE parsing of a free-form answer, as RUCAIBox/POPE `evaluate.py` and LLaVA's
    `llava/eval/eval_pope.py` both write it: keep the text before the first '.', drop commas, split on single spaces;
    "no" when one of the words is exactly "No", "no" or "not", else "yes" (so an answer naming neither counts as yes,
    and "NO", "Not" or "don't" do not say no)."""
    text = prediction.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's metrics as its official script computes them from parsed answers ('yes' is the positive class):
    accuracy, precision TP/(TP+FP), recall TP/(TP+FN), F1, and the yes-ratio (the share of answers parsed as yes).
    Where the official script would divide by zero (no answer parsed as yes, no positive label), 0.0."""
    for name, values in (("predictions", predictions), ("labels", labels)):
        odd = sorted({repr(value) for value in values if value not in ("yes", "no")})
        if odd:
            raise ValueError(f"POPE {name} must be 'yes' or 'no' (parse answers with yes_no), got {', '.join(odd)}")
    pairs = list(zip(predictions, labels, strict=True))
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
