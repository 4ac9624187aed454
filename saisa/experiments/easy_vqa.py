"""Real questions about real images: easy-VQA (PyPI `easy-vqa`, which ships its 4,000 + 1,000 images and their
questions: one shape of one colour per image; answers yes/no, a shape or a colour), written as LLaVA-format JSON
(align captions, instruct questions, held-out question files) plus PNGs.

Align captions ("A blue rectangle.") are made from the answers the package gives about each image: its shape from a
question answered by a shape, its colour from one answered by a colour or from the colour a shape question names.
Instruct records are the package's questions themselves, one per record. Questions are sampled balanced over the 13
answers; validation questions are on training-split images that no training record uses; test questions are on the
test split's images. Yes/no questions are written as the evaluation's `yes_no` kind, the others as short answers."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

INSTRUCTION = "Answer with one word."
SHAPES = ("circle", "rectangle", "triangle")
HELD_OUT_IMAGES = 0.2  # the share of training-split images kept for validation questions


def _package():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("easy-VQA needs its package: `pip install easy-vqa` (or the `embedded` extra)") from error
    return easy_vqa


def load_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """The package's (question, answer, image id) triples of a split, and its image paths by id."""
    package = _package()
    questions = package.get_train_questions() if split == "train" else package.get_test_questions()
    paths = package.get_train_image_paths() if split == "train" else package.get_test_image_paths()
    return list(zip(*questions, strict=True)), paths


def answers() -> list[str]:
    return _package().get_answers()


def captions(questions: list[tuple[str, str, int]], colours: set[str]) -> dict[int, str]:
    """image id -> "A <colour> <shape>." for every image whose questions tell both."""
    known: dict[int, dict[str, str]] = defaultdict(dict)
    for text, answer, image in questions:
        if answer in SHAPES:
            known[image]["shape"] = answer
            named = [word for word in text.rstrip("?").split() if word in colours]  # "what is the blue shape?"
            if named:
                known[image]["colour"] = named[0]
        elif answer in colours:
            known[image]["colour"] = answer
    return {image: f"A {parts['colour']} {parts['shape']}." for image, parts in known.items() if len(parts) == 2}


def _balanced(keys: list[str], per_key: int, rng: np.random.Generator, what: str) -> list[int]:
    """`per_key` random indices of every distinct key (sorted keys: the same draw on every machine), shuffled."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        by_key[key].append(index)
    picks = []
    for key in sorted(by_key):
        if len(by_key[key]) < per_key:
            raise ValueError(f"easy-VQA has {len(by_key[key])} {what} for {key!r}, fewer than the {per_key} asked for")
        picks.append(rng.choice(by_key[key], per_key, replace=False))
    order = np.concatenate(picks) if picks else np.array([], dtype=int)
    rng.shuffle(order)
    return [int(i) for i in order]


def prepare(
    out: Path,
    *,
    align_per_caption: int,
    instruct_per_answer: int,
    val_per_answer: int,
    test_per_answer: int,
    seed: int = 0,
) -> dict[str, Path]:
    """Write images/ plus align.json, instruct.json, val.jsonl and test.jsonl under `out`; returns their paths.
    Sizes are per caption (24 shape and colour pairs) or per answer (13)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = set(answers()) - set(SHAPES) - {"yes", "no"}
    train, train_paths = load_split("train")
    test, test_paths = load_split("test")
    held_out = set(rng.choice(sorted(train_paths), round(HELD_OUT_IMAGES * len(train_paths)), replace=False).tolist())
    training = [i for i, (_, _, image) in enumerate(train) if image not in held_out]  # indices into `train`
    validation = [i for i, (_, _, image) in enumerate(train) if image in held_out]
    described = sorted(captions([train[i] for i in training], colours).items())
    align = [
        _caption_record(out, train_paths, *described[i])
        for i in _balanced([c for _, c in described], align_per_caption, rng, "training images")
    ]
    instruct = [
        _question_record(out, train_paths, train[training[i]])
        for i in _balanced([train[i][1] for i in training], instruct_per_answer, rng, "training questions")
    ]
    rows = {
        "val": [
            _question_row(out, "train", train_paths, train, validation[i])
            for i in _balanced([train[i][1] for i in validation], val_per_answer, rng, "validation questions")
        ],
        "test": [
            _question_row(out, "test", test_paths, test, i)
            for i in _balanced([answer for _, answer, _ in test], test_per_answer, rng, "test questions")
        ],
    }
    paths = {name: out / f"{name}.json" for name in ("align", "instruct")}
    paths["align"].write_text(json.dumps(align))
    paths["instruct"].write_text(json.dumps(instruct))
    for split, split_rows in rows.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    return paths


def _copy_image(out: Path, split: str, paths: dict[int, str], image: int) -> str:
    name = f"images/{split}_{image}.png"
    if not (out / name).exists():
        shutil.copyfile(paths[image], out / name)
    return name


def _prompt(question: str) -> str:
    return f"{question} {INSTRUCTION}"


def _caption_record(out: Path, paths: dict[int, str], image: int, caption: str) -> dict:
    return {
        "id": f"train_{image}",
        "image": _copy_image(out, "train", paths, image),
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}],
    }


def _question_record(out: Path, paths: dict[int, str], question: tuple[str, str, int]) -> dict:
    text, answer, image = question
    return {
        "id": f"train_{image}",
        "image": _copy_image(out, "train", paths, image),
        "conversations": [{"from": "human", "value": f"<image>\n{_prompt(text)}"}, {"from": "gpt", "value": answer}],
    }


def _question_row(out: Path, split: str, paths: dict[int, str], questions: list, index: int) -> dict:
    """A row of the evaluation's question JSONL: yes/no questions as the `yes_no` kind (`label`), others as short
    answers (`answer`, exact match)."""
    text, answer, image = questions[index]
    row = {"question_id": f"{split}_{index}", "image": _copy_image(out, split, paths, image), "text": _prompt(text)}
    row["label" if answer in ("yes", "no") else "answer"] = answer
    return row
