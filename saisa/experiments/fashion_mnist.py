"""Real images with text made from their real labels: Fashion-MNIST from Debian's `dataset-fashion-mnist` package,
written as LLaVA-format JSON (align captions, instruct questions, a held-out question file) plus PNGs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
QUESTION = "What is this item? Answer with its name."


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(split: str, folder: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"{images} not found: install Debian's package with `apt-get install dataset-fashion-mnist`"
        )
    return _read_idx(images), _read_idx(labels)


def _balanced(labels: np.ndarray, per_class: int, seed: int, *, held_out_per_class: int = 0) -> tuple[np.ndarray, ...]:
    """`per_class` random indices of every class, shuffled; and `held_out_per_class` others of every class."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class + held_out_per_class, replace=False)
        for c in range(len(CLASSES))
    ]
    order = np.concatenate([p[:per_class] for p in picks])
    held_out = np.concatenate([p[per_class:] for p in picks])
    rng.shuffle(order)
    rng.shuffle(held_out)
    return order, held_out


def prepare(
    out: Path, *, train_per_class: int = 200, test_per_class: int = 50, val_per_class: int = 0, seed: int = 0
) -> dict[str, Path]:
    """Write images/ plus align.json, instruct.json and test.jsonl under `out` (and val.jsonl: questions on
    training-split images that no training record uses, for choosing hyper-parameters); returns their paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    align, instruct = [], []
    train_order, val_order = _balanced(train_labels, train_per_class, seed, held_out_per_class=val_per_class)
    for i in train_order:
        name = _write_image(out, "train", i, train_images)
        label = CLASSES[train_labels[i]]
        align.append(
            {
                "id": f"train_{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"A photo of a {label.lower()}."},
                ],
            }
        )
        instruct.append(
            {
                "id": f"train_{i}",
                "image": name,
                "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": label}],
            }
        )
    test_order, _ = _balanced(test_labels, test_per_class, seed + 1)
    questions = {
        "test": [_question(out, "test", i, test_images, test_labels) for i in test_order],
        "val": [_question(out, "train", i, train_images, train_labels) for i in val_order],
    }
    paths = {"align": out / "align.json", "instruct": out / "instruct.json", "test": out / "test.jsonl"}
    paths["align"].write_text(json.dumps(align))
    paths["instruct"].write_text(json.dumps(instruct))
    if val_per_class:
        paths["val"] = out / "val.jsonl"
    for split in ("test", "val"):
        if split in paths:
            paths[split].write_text("".join(json.dumps(row) + "\n" for row in questions[split]))
    return paths


def keep_first_records(path: Path, count: int) -> None:
    """Keep the first `count` records of a `prepare` JSON file (class-balanced and shuffled: any prefix is too)."""
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records[:count]))


def _write_image(out: Path, split: str, index: int, images: np.ndarray) -> str:
    name = f"images/{split}_{index}.png"
    if not (out / name).exists():
        Image.fromarray(images[index]).convert("RGB").save(out / name)
    return name


def _question(out: Path, split: str, index: int, images: np.ndarray, labels: np.ndarray) -> dict:
    name = _write_image(out, split, index, images)
    return {"question_id": f"{split}_{index}", "image": name, "text": QUESTION, "answer": CLASSES[labels[index]]}
