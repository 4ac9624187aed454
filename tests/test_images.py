"""Decompression bombs and oversized images are a clear per-image error wherever images are opened: the processor,
the training data, evaluation (and the server, in test_serving.py), refused from the header before decoding."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from conftest import tiny_chat_processor, tiny_model, tiny_processor
from PIL import Image

from saisa.evaluation import evaluate
from saisa.processing import open_image
from saisa.training.data import LlavaJsonDataset


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and holds no pixel data: only decoding it would find out."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


@pytest.fixture
def bombs(tmp_path):
    """Above PIL's bomb error (2x MAX_IMAGE_PIXELS), between its warning and its error, and a good image."""
    (tmp_path / "bomb.png").write_bytes(png_header(30_000, 30_000))
    (tmp_path / "large.png").write_bytes(png_header(10_000, 10_000))
    Image.new("RGB", (12, 12), "red").save(tmp_path / "ok.png")
    return tmp_path


@pytest.mark.parametrize("name", ["bomb.png", "large.png"])
def test_open_image_refuses_from_the_header(bombs, name):
    with pytest.raises(ValueError, match=rf"refusing image .*{name}: .*pixels"):
        open_image(bombs / name)
    with pytest.raises(ValueError, match="refusing image upload: 10000x10000"):
        open_image(png_header(10_000, 10_000), name="upload", max_pixels=4096 * 4096)
    assert open_image(bombs / "ok.png").size == (12, 12)


def test_processor_names_the_refused_image(bombs):
    processor = tiny_processor()
    with pytest.raises(ValueError, match="refusing image .*bomb.png"):
        processor(text="what <image>", return_tensors="pt", images=[bombs / "bomb.png"])
    assert processor(text="what <image>", return_tensors="pt", images=[bombs / "ok.png"])["pixel_values"].shape == (
        1,
        3,
        16,
        16,
    )


def test_training_data_reports_or_skips_the_refused_image(bombs):
    records = [
        {
            "id": name,
            "image": name,
            "conversations": [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "a cat"}],
        }
        for name in ("bomb.png", "ok.png")
    ]
    (bombs / "train.json").write_text(json.dumps(records))

    def dataset(**kwargs) -> LlavaJsonDataset:
        return LlavaJsonDataset(
            bombs / "train.json", bombs, tiny_processor(), template="tokenizer", tokens_per_image=16, **kwargs
        )

    with pytest.raises(ValueError, match="record 0, sample bomb.png: refusing image .*bomb.png"):
        dataset()[0]
    assert dataset(skip_bad_images=True)[0]["pixel_values"].shape == (1, 3, 16, 16)  # the next sample stands in


def test_eval_records_the_refused_image_and_goes_on(bombs):
    rows = [
        {"question_id": "bomb", "image": "bomb.png", "text": "what ?", "answer": "w20"},
        {"question_id": "ok", "image": "ok.png", "text": "what ?", "answer": "w20"},
    ]
    (bombs / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = evaluate(tiny_model("saisa"), tiny_chat_processor(), bombs / "q.jsonl", bombs, out_dir=bombs / "out")
    assert metrics["answered"] == 1 and metrics["missing_images"] == 1
    records = {r["question_id"]: r for r in map(json.loads, (bombs / "out" / "predictions.jsonl").open())}
    assert "refusing image" in records["bomb"]["error"] and records["ok"]["prediction"] is not None
