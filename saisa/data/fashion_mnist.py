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


def _balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(len(CLASSES))]
    order = np.concatenate(picks)
    rng.shuffle(order)
    return order


def prepare(out: Path, *, train_per_class: int = 200, test_per_class: int = 50, seed: int = 0) -> dict[str, Path]:
    """Write images/ plus align.json, instruct.json and test.jsonl under `out`; returns their paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    align, instruct, test = [], [], []
    for i in _balanced(train_labels, train_per_class, seed):
        name = f"images/train_{i}.png"
        if not (out / name).exists():
            Image.fromarray(train_images[i]).convert("RGB").save(out / name)
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
    for i in _balanced(test_labels, test_per_class, seed + 1):
        name = f"images/test_{i}.png"
        if not (out / name).exists():
            Image.fromarray(test_images[i]).convert("RGB").save(out / name)
        test.append({"question_id": f"test_{i}", "image": name, "text": QUESTION, "answer": CLASSES[test_labels[i]]})
    paths = {"align": out / "align.json", "instruct": out / "instruct.json", "test": out / "test.jsonl"}
    paths["align"].write_text(json.dumps(align))
    paths["instruct"].write_text(json.dumps(instruct))
    paths["test"].write_text("".join(json.dumps(row) + "\n" for row in test))
    return paths
