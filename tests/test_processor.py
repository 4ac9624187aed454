"""SaisaProcessor: placeholders, images, chat template, persistence, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from conftest import tiny_processor as make_processor
from PIL import Image

from saisa.processing import SaisaProcessor


def test_placeholder_is_one_token_and_images_are_stacked():
    processor = make_processor()
    images = [[Image.new("RGB", (20, 10), "red")], [Image.new("RGB", (8, 8)), Image.new("RGB", (5, 9))]]
    batch = processor(text=["what is <image> ?", "<image> and <image> a cat"], return_tensors="pt", images=images)
    assert (batch["input_ids"] == processor.image_token_id).sum().item() == 3
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["attention_mask"][0, 0] == 0  # left padding by default


def test_pad_to_square_keeps_aspect_ratio():
    processor = make_processor(image_size=16)
    wide = Image.new("RGB", (32, 16), (255, 255, 255))
    pixels = processor.preprocess_images([wide])[0]  # white band in the middle, mean-grey bars above and below
    assert torch.allclose(pixels[:, 8, :], torch.ones(3, 16))
    assert torch.allclose(pixels[:, 0, :], torch.zeros(3, 16), atol=0.01)


def test_chat_template_with_image_items_and_model_round_trip():
    processor = make_processor()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}],
        add_generation_prompt=True,
    )
    assert prompt.startswith("user: <image>\nwhat is this ?") and prompt.endswith("assistant:")
    batch = processor(text=prompt, return_tensors="pt", images=[Image.new("RGB", (16, 16))])
    model = tiny_model("saisa")
    model.config.image_token_id = processor.image_token_id
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_count_mismatch_is_named():
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        make_processor()(text="what is <image>", images=[Image.new("RGB", (4, 4))] * 2)


def test_missing_and_corrupt_image_files_are_named(tmp_path):
    processor = make_processor()
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.png"):
        processor(text="<image>", return_tensors="pt", images=[str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        processor(text="<image>", return_tensors="pt", images=[str(bad)])


def test_save_and_load(tmp_path):
    processor = make_processor()
    processor.save_pretrained(tmp_path)
    loaded = SaisaProcessor.from_pretrained(tmp_path)
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.preprocessing == processor.preprocessing
    text = "<image> what is a cat ?"
    assert torch.equal(
        loaded(text=text, return_tensors="pt", images=[Image.new("RGB", (3, 3))])["input_ids"],
        processor(text=text, return_tensors="pt", images=[Image.new("RGB", (3, 3))])["input_ids"],
    )
