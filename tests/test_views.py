"""High resolution and video (`saisa.processing.views`): AnyRes tiles are LLaVA-NeXT's (checked against transformers'
LlavaNextImageProcessor), a video is its uniformly sampled frames, each view one `<image>` placeholder in the text's
order; every architecture runs them as the equations say, batched as per row, through generate and the image KV
cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_chat_processor, tiny_model
from PIL import Image
from reference import reference_logits
from test_model import _pad_batch
from transformers import TrainerCallback

from saisa import ImageKVCache
from saisa.processing import SaisaProcessor
from saisa.processing.views import anyres_grid_pinpoints, repeat_placeholders

ARCHS = ["saisa", "llava", "naavit"]
SIDE = 16  # the tiny encoder's image side


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8))


def _tiling(processor: SaisaProcessor | None = None, **kwargs) -> SaisaProcessor:
    base = processor or tiny_chat_processor()
    return SaisaProcessor(
        base.tokenizer,
        base.image_processor,
        chat_template=base.chat_template,
        image_grid_pinpoints=anyres_grid_pinpoints(SIDE, 4),
        **kwargs,
    )


def _video(frames: int, seed: int = 3) -> np.ndarray:
    """(T, H, W, 3) uint8 frames whose first pixel holds the frame's index."""
    video = np.random.default_rng(seed).integers(0, 255, (frames, 12, 10, 3), np.uint8)
    video[:, 0, 0, 0] = np.arange(frames)
    return video


@pytest.mark.parametrize("size", [(45, 20), (20, 45), (30, 30), (50, 3), (64, 17)])
def test_tiles_are_llava_nexts(size):
    from transformers import LlavaNextImageProcessorPil

    processor = _tiling()
    reference = LlavaNextImageProcessorPil(
        image_grid_pinpoints=anyres_grid_pinpoints(SIDE, 4),
        size={"shortest_edge": SIDE},
        crop_size={"height": SIDE, "width": SIDE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_pad=False,
    )
    image = _image(*size)
    expected = reference(image, return_tensors="pt")["pixel_values"][0]  # (views, 3, S, S)
    got = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert got.shape == expected.shape and got.shape[0] > 1
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    height, width = image.height, image.width
    counts = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
    assert counts.num_image_tokens == [got.shape[0]] == [processor.num_views(image.size)]


def test_the_grid_follows_the_aspect_ratio():
    processor = _tiling()
    assert processor.num_views((40, 16)) == 1 + 3  # wide: a row of tiles
    assert processor.num_views((16, 40)) == 1 + 3  # tall: a column
    assert processor.num_views((32, 32)) == 1 + 4  # square: 2 x 2
    assert processor.max_views() == 8 and processor.max_views(3) == 1 + 4


def test_video_frames_are_sampled_uniformly_first_and_last_included():
    processor = tiny_chat_processor()
    frames = processor.views(_video(20), "video")
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [0, 3, 5, 8, 11, 14, 16, 19]  # round(linspace(0, 19, 8))
    short = processor.views(_video(3), "video")
    assert [np.asarray(f)[0, 0, 0] for f in short] == [0, 1, 2]


def test_placeholders_and_views_follow_the_texts_order():
    processor = _tiling()
    wide, square, video = _image(40, 16), _image(32, 32, seed=1), _video(9)
    out = processor(
        num_frames=3,
        text=["what <video> is <image> ?", "<image> this"],
        images=[wide, square],
        videos=[video],
        padding=True,
        return_tensors="pt",
        return_text_replacement_offsets=True,
    )
    views = processor.views(video, "video", 3) + processor.views(wide) + processor.views(square)
    torch.testing.assert_close(out["pixel_values"], processor.preprocess_images(views), atol=0, rtol=0)
    image_id = processor.image_token_id
    counts = (out["input_ids"] == image_id).sum(1).tolist()
    assert counts == [3 + 4, 5]
    first = out["input_ids"][0][out["attention_mask"][0].bool()].tolist()
    what, is_ = processor.tokenizer.convert_tokens_to_ids(["what", "is"])
    assert first == [what] + [image_id] * 3 + [is_] + [image_id] * 4 + first[-1:]
    spans = out["text_replacement_offsets"][0]
    assert [s["type"] for s in spans] == ["video", "image"]
    assert spans[0]["replacement"] == processor.image_token * 3


def test_counts_are_checked_and_video_files_refused():
    processor = tiny_chat_processor()
    with pytest.raises(ValueError, match="1 <video> placeholder.*0 video"):
        processor(text="what <video>")
    with pytest.raises(ValueError, match="0 <video> placeholder.*1 video"):
        processor(text="what", videos=[_video(2)])
    with pytest.raises(ValueError, match="video files are not decoded"):
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}], tokenize=True
        )
    with pytest.raises(ValueError, match="multiples of the encoder's image side 16"):
        _tiling_with([[16, 20]])


def _tiling_with(pinpoints):
    base = tiny_chat_processor()
    return SaisaProcessor(base.tokenizer, base.image_processor, image_grid_pinpoints=pinpoints)


def test_settings_survive_save_and_load(tmp_path):
    processor = _tiling(video_token="<clip>")
    processor.save_pretrained(tmp_path)
    loaded = SaisaProcessor.from_pretrained(tmp_path)
    assert loaded.image_grid_pinpoints == processor.image_grid_pinpoints and loaded.video_token == "<clip>"


def test_chat_messages_carry_videos():
    processor = tiny_chat_processor()
    video = _video(4)
    conversation = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "what"}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 4
    torch.testing.assert_close(out["pixel_values"], processor(videos=[video])["pixel_values"], atol=0, rtol=0)


def _rows(processor: SaisaProcessor):
    """Two prompts: a tiled wide image, and a video with a square image (several spans in one row)."""
    first = processor(text="what is <image> ?", images=[_image(40, 16)])
    second = processor(text="<video> what <image> is", images=[_image(32, 32, 1)], videos=[_video(5)], num_frames=3)
    return [(row["input_ids"][0], torch.as_tensor(np.asarray(row["pixel_values"]))) for row in (first, second)]


@pytest.mark.parametrize("arch", ARCHS)
def test_views_follow_the_equations_and_a_batch_equals_its_rows(arch):
    model = tiny_model(arch)
    processor = _tiling()
    rows = _rows(processor)
    with torch.no_grad():
        for ids, pixels in rows:
            got = model(torch.tensor([ids]), pixel_values=pixels).logits[0]
            expected = reference_logits(model, torch.tensor(ids), pixels)
            text = torch.tensor(ids) != processor.image_token_id
            torch.testing.assert_close(got[text], expected[text], atol=1e-5, rtol=1e-5)
        ids, mask = _pad_batch([list(ids) for ids, _ in rows], "left")
        pixels = torch.cat([p for _, p in rows])
        batched = model.generate(
            ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        for row, (ids_row, pixels_row) in enumerate(rows):
            alone = model.generate(
                torch.tensor([ids_row]), pixel_values=pixels_row, max_new_tokens=5, do_sample=False, pad_token_id=0
            )
            assert batched[row, ids.shape[1] :].tolist() == alone[0, len(ids_row) :].tolist()


def test_tiles_and_frames_through_the_image_kv_cache():
    model = tiny_model("saisa", "qwen3")
    rows = _rows(_tiling())
    plain = [model.generate(torch.tensor([i]), pixel_values=p, max_new_tokens=5, do_sample=False) for i, p in rows]
    model.image_kv_cache = ImageKVCache()
    for _ in range(2):  # filled, then every view a hit
        cached = [model.generate(torch.tensor([i]), pixel_values=p, max_new_tokens=5, do_sample=False) for i, p in rows]
        assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    views = sum(p.shape[0] for _, p in rows)
    assert model.image_kv_cache.hits == views


# -- training data -----------------------------------------------------------------------------------------------------
def _frames_on_disk(folder, count: int) -> list[str]:
    names = []
    for index, frame in enumerate(_video(count)):
        names.append(f"frame{index}.png")
        Image.fromarray(frame).save(folder / names[-1])
    return names


def test_training_samples_are_the_processors_inputs(tmp_path):
    from saisa.processing.templates import get_template
    from saisa.training.data import LlavaJsonDataset

    _image(40, 16).save(tmp_path / "wide.png")
    frames = _frames_on_disk(tmp_path, 11)
    turns = [
        {"from": "human", "value": "<video> what is <image> ?"},
        {"from": "gpt", "value": "a cat"},
    ]
    (tmp_path / "train.json").write_text(json.dumps([{"image": "wide.png", "video": frames, "conversations": turns}]))
    processor = _tiling()
    dataset = LlavaJsonDataset(
        tmp_path / "train.json", tmp_path, processor, template="tokenizer", tokens_per_image=16, num_frames=4
    )
    sample = dataset[0]
    text = get_template("tokenizer", processor.tokenizer).render(turns).text
    expected = processor(
        text=text,
        images=[Image.open(tmp_path / "wide.png")],
        videos=[[Image.open(tmp_path / name) for name in frames]],
        num_frames=4,
        return_tensors="pt",
    )
    assert sample["input_ids"].tolist() == expected["input_ids"][0].tolist()
    torch.testing.assert_close(sample["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    assert (sample["labels"] != -100).sum() > 0
    assert (sample["labels"][sample["input_ids"] == processor.image_token_id] == -100).all()


def test_truncation_drops_a_tiled_image_whole(tmp_path):
    from saisa.training.data import LlavaJsonDataset

    _image(40, 16).save(tmp_path / "wide.png")  # 4 views: 64 positions
    turns = [
        {"from": "human", "value": "what is this ?"},
        {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "what is <image> ?"},  # 64 positions: they do not fit in 40
        {"from": "gpt", "value": "a cat"},
    ]
    (tmp_path / "train.json").write_text(json.dumps([{"image": "wide.png", "conversations": turns}]))
    dataset = LlavaJsonDataset(
        tmp_path / "train.json", tmp_path, _tiling(), template="tokenizer", tokens_per_image=16, max_length=40
    )
    sample = dataset[0]
    assert "pixel_values" not in sample and int((sample["input_ids"] == dataset.processor.image_token_id).sum()) == 0
    what_is = dataset.processor.tokenizer.convert_tokens_to_ids(["what", "is"])
    assert sample["input_ids"][-2:].tolist() == what_is and dataset.stats.truncated == 1  # cut where the image began


def test_a_video_record_with_the_wrong_placeholders_is_named(tmp_path):
    from saisa.training.data import LlavaJsonDataset

    frames = _frames_on_disk(tmp_path, 2)
    turns = [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "a cat"}]
    (tmp_path / "train.json").write_text(json.dumps([{"video": frames, "conversations": turns}]))
    with pytest.raises(ValueError, match="0 <video> placeholder.*but 1 video"):
        LlavaJsonDataset(tmp_path / "train.json", tmp_path, _tiling(), template="tokenizer", tokens_per_image=16)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_tiles_and_frames(tmp_path, arch):
    from test_data_and_recipes import _write_run

    from saisa.training import run_training

    _image(40, 16).save(tmp_path / "wide.png")
    frames = _frames_on_disk(tmp_path, 5)
    turns = [{"from": "human", "value": "<video> what is <image> ?"}, {"from": "gpt", "value": "a cat"}]
    recipe = _write_run(tmp_path, [{"image": "wide.png", "video": frames, "conversations": turns}] * 4)
    recipe["architecture"] = arch
    tiny_model(arch, image_token_id=SaisaProcessor.from_pretrained(tmp_path / "init").image_token_id).save_pretrained(
        tmp_path / "init"
    )
    recipe["data"].update(max_tiles=4, num_frames=3)
    losses = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            losses.extend([logs["loss"]] if "loss" in (logs or {}) else [])

    output = run_training(recipe, callbacks=[Losses()])
    saved = SaisaProcessor.from_pretrained(output)
    assert saved.image_grid_pinpoints == anyres_grid_pinpoints(SIDE, 4)  # inference tiles as training did
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0


def test_token_level_placeholders_repeat_as_the_processor_writes_them():
    """Training and serving expand token ids themselves (each image's one `<image>` id -> one per view): the same ids
    as the processor's text-level expansion, labels repeated alongside, and a miscount named."""
    processor = _tiling()
    wide, tall = _image(3 * SIDE, SIDE, seed=7), _image(SIDE, 2 * SIDE, seed=8)
    text = "<image> what is this ? <image> and this ?"
    expanded = processor(images=[wide, tall], text=[text])["input_ids"][0]
    ids = processor.tokenizer(text)["input_ids"]
    views = [processor.num_views(wide.size), processor.num_views(tall.size)]
    labels = list(range(len(ids)))
    repeated, repeated_labels = repeat_placeholders(ids, processor.image_token_id, views, labels)
    assert repeated == expanded and sum(views) > 2
    copies, image = iter(views), processor.image_token_id
    runs = [[label] * (next(copies) if t == image else 1) for t, label in zip(ids, labels, strict=True)]
    assert repeated_labels == [label for run in runs for label in run]
    with pytest.raises(ValueError, match="2 image tokens for 3 images"):
        repeat_placeholders(ids, processor.image_token_id, [1, 1, 1])
