"""Recipes and data that fail loudly: unknown keys, `2e-4`, merge-lora after the two-stage path, broken records."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from saisa.processing import open_image
from saisa.training import load_recipe, run_training
from saisa.training.data import LlavaJsonDataset
from saisa.training.recipe import RECIPES_DIR

QUESTION = {"from": "human", "value": "<image>\nwhat is this ?"}


def _record(i: int, answer: str = "a cat") -> dict:
    return {"id": str(i), "image": f"img{i % 4}.png", "conversations": [QUESTION, {"from": "gpt", "value": answer}]}


def _write_data(tmp_path, records: list) -> dict:
    """Four 16x16 images and `records` as train.json; returns the recipe's `data` section."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "train.json").write_text(json.dumps(records))
    return {"train": str(tmp_path / "train.json"), "image_folder": str(tmp_path), "template": "tokenizer"}


def _write_run(tmp_path, records: list | None = None, **model_kwargs) -> dict:
    processor = tiny_processor()
    model = tiny_model("saisa", image_token_id=processor.image_token_id, **model_kwargs)
    model.save_pretrained(tmp_path / "init")
    processor.save_pretrained(tmp_path / "init")
    records = records if records is not None else [_record(i, ["a cat", "this is a cat"][i % 2]) for i in range(4)]
    return {
        "architecture": "saisa",
        "stage": "instruct",
        "model": {"init": str(tmp_path / "init")},
        "data": _write_data(tmp_path, records),
        "output_dir": str(tmp_path / "out"),
        "training": {
            "per_device_train_batch_size": 2,
            "max_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_steps": 100,
            "seed": 0,
        },
    }


def _dataset(tmp_path, **kwargs) -> LlavaJsonDataset:
    return LlavaJsonDataset(
        tmp_path / "train.json", tmp_path, tiny_processor(), template="tokenizer", tokens_per_image=16, **kwargs
    )


# --- recipes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "nearest"),
    [
        ("data.max_lenght=5", "data.max_lenght", "data.max_length"),
        ("trainig.learning_rate=0.1", "trainig", "training"),
        ("training.learnig_rate=0.1", "training.learnig_rate", "training.learning_rate"),
        ("training.activation_checkpoint=true", "training.activation_checkpoint", "training.activation_checkpointing"),
        ("training.group_by_lenght=false", "training.group_by_lenght", "training.group_by_length"),
        ("model.shared_projecter=true", "model.shared_projecter", "model.shared_projector"),
        ("lora.alpah=8", "lora.alpah", "lora.alpha"),
        ("freeze_lm=true", "freeze_lm", "freeze_llm"),
    ],
)
def test_an_unknown_key_names_itself_and_the_nearest_valid_one(override, key, nearest):
    with pytest.raises(ValueError, match=re.escape(f"unknown recipe key `{key}`; did you mean `{nearest}`?")):
        load_recipe("embedded-instruct", [override])


def test_an_unknown_key_in_a_recipe_file_is_refused_too(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("stage: align\ndata: {train: x.json, skip_bad_image: true}\ntraining: {zzz: 1}\n")
    with pytest.raises(ValueError) as raised:
        load_recipe(path)
    assert "`data.skip_bad_image`; did you mean `data.skip_bad_images`?" in str(raised.value)
    assert "`training.zzz`; `training` takes TrainingArguments fields" in str(raised.value)  # every problem at once
    path.write_text("stage: align\nlora: 16\n")
    with pytest.raises(ValueError, match="recipe `lora` must be a mapping of keys, got 16"):
        load_recipe(path)
    with pytest.raises(ValueError, match=r"`stage` is 'align', not a mapping"):
        load_recipe(path, ["stage.name=x"])


def test_valid_keys_and_every_shipped_recipe_load():
    for path in RECIPES_DIR.glob("*.yaml"):
        load_recipe(path)
    recipe = load_recipe(
        "vicuna7b-clip336-instruct",
        [
            "training.gradient_checkpointing=true",
            "training.group_by_length=false",
            "expand_shared_projector=false",
            "training.fsdp_config.transformer_layer_cls_to_wrap=[LlamaDecoderLayer]",
            "data.skip_bad_images=true",
        ],
    )
    assert recipe["training"]["fsdp_config"] == {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "stage: instruct\ntraining: {learning_rate: 2e-4, adam_epsilon: 1E-8, max_grad_norm: 1e0}\n"
        "output_dir: runs/1e5x\n"
    )
    training = load_recipe(path)["training"]
    assert training == {"learning_rate": 2e-4, "adam_epsilon": 1e-8, "max_grad_norm": 1.0}
    assert all(isinstance(value, float) for value in training.values())
    recipe = load_recipe(
        path, ["training.learning_rate=3e-5", "training.weight_decay=1E5", "lora.dropout=.5e-1", "output_dir=2e-4x"]
    )
    assert recipe["training"]["learning_rate"] == 3e-5 and recipe["training"]["weight_decay"] == 1e5
    assert recipe["lora"]["dropout"] == 0.05 and recipe["output_dir"] == "2e-4x"
    assert yaml.safe_load("x: 2e-4") == {"x": "2e-4"}  # PyYAML's own SafeLoader is left as it is


# --- merge-lora after the two-stage path --------------------------------------------------------------------------


def test_merge_lora_after_align_with_a_shared_projector_and_lora_instruct(tmp_path):
    from saisa.cli import main

    recipe = _write_run(tmp_path, shared_projector=True)
    align = run_training({**recipe, "stage": "align", "output_dir": str(tmp_path / "align")})
    assert "projector.linear_1.weight" in load_file(align / "model.safetensors")
    instruct = run_training(
        {
            **recipe,
            "model": {"init": str(align)},
            "output_dir": str(tmp_path / "instruct"),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        }
    )
    saved = load_file(instruct / "model.safetensors")
    assert "layer_projectors.2.linear_1.weight" in saved

    assert main(["merge-lora", str(instruct / "adapter"), "--base", str(align), "--out", str(tmp_path / "m")]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(merged[key], value, msg=key)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["shared_projector"] is False


# --- data -----------------------------------------------------------------------------------------------------------


BROKEN_RECORDS = {
    "a string record": ("hello", r"record 2: a record must be a JSON object, got \"hello\""),
    "no conversations": (
        {"id": "b", "image": "img0.png"},
        r"record 2, sample b: `conversations` must be a non-empty list of turns, got null",
    ),
    "empty conversations": ({"id": "b", "conversations": []}, r"record 2, sample b: `conversations` must be"),
    "a turn that is not an object": ({"conversations": ["hi"]}, r"record 2: turn 0 must be a JSON object"),
    "value null": (
        {"id": "b", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
        r"record 2, sample b: turn 0: `value` must be a string, got null",
    ),
    "value not a string": (
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 5}]},
        r"record 2, sample b: turn 1: `value` must be a string, got 5",
    ),
    "no value": ({"id": 7, "conversations": [{"from": "human"}]}, r"record 2, sample 7: turn 0: `value` must be"),
    "unknown role": (
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "a"}]},
        r"record 2, sample b: turn 1: unknown conversation role 'bot'",
    ),
    "system turn not first": (
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "system", "value": "be nice"}]},
        r"record 2, sample b: turn 1: a system turn may only come first",
    ),
    "more images than placeholders": (
        {"id": "b", "image": ["img0.png", "img1.png"], "conversations": [QUESTION, {"from": "gpt", "value": "a"}]},
        r"record 2, sample b: 1 <image> placeholder\(s\) but 2 image\(s\)",
    ),
    "placeholder without image": (
        {"id": "b", "conversations": [QUESTION, {"from": "gpt", "value": "a"}]},
        r"record 2, sample b: 1 <image> placeholder\(s\) but 0 image\(s\)",
    ),
    "image not a name": (
        {"id": "b", "image": 3, "conversations": [QUESTION, {"from": "gpt", "value": "a"}]},
        r"record 2, sample b: `image`/`images` must be a file name or a list of them, got 3",
    ),
}


@pytest.mark.parametrize("case", BROKEN_RECORDS)
def test_a_broken_record_names_file_and_index_or_is_skipped(tmp_path, case):
    broken, message = BROKEN_RECORDS[case]
    _write_data(tmp_path, [_record(0), _record(1), broken, _record(3)])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train.json")) + ": " + message):
        _dataset(tmp_path)
    lenient = _dataset(tmp_path, skip_bad_images=True)
    assert len(lenient) == 3 and lenient.record_indices == [0, 1, 3]
    assert list(lenient.stats.skipped_records) == [2] and lenient.stats.skipped == 1
    assert all("input_ids" in lenient[i] for i in range(len(lenient)))
    assert len(lenient.lengths) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[{"id": "0", "conversations": []},\n  oops]', r"invalid JSON: Expecting value: line 2 column 3"),
        ('[{"id": "caf\u00e9"}]'.encode("latin-1"), r"not UTF-8 text"),
        (b"[]", r"the list of records is empty"),
        (b'{"conversations": []}', r"must hold a JSON list of LLaVA records"),
    ],
)
def test_an_unreadable_file_is_named(tmp_path, content, message):
    (tmp_path / "train.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train.json")) + ".*" + message):
        _dataset(tmp_path)


def test_a_utf8_file_with_a_bom_loads(tmp_path):
    _write_data(tmp_path, [])
    (tmp_path / "train.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([_record(0, "caf\u00e9")]).encode())
    assert len(_dataset(tmp_path)) == 1


@pytest.mark.parametrize("answers", [[None, None], ["", "  "]], ids=["no assistant turn", "empty assistant turns"])
def test_a_dataset_with_nothing_to_learn_is_refused_before_training(tmp_path, caplog, answers):
    records = [{"id": str(i), "image": f"img{i}.png", "conversations": [QUESTION]} for i in range(2)]
    for record, answer in zip(records, answers, strict=True):
        if answer is not None:
            record["conversations"] = [QUESTION, {"from": "gpt", "value": answer}]
    recipe = _write_run(tmp_path, records)
    caplog.set_level(logging.INFO, logger="saisa")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train.json")) + ": no record has an assistant"):
        run_training(recipe)
    assert "saved the trained model" not in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_decompression_bomb_is_a_clear_image_error_that_skipping_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the 16x16 (256-pixel) images stay below it
    _write_data(tmp_path, [_record(i) for i in range(4)])
    Image.new("RGB", (32, 32)).save(tmp_path / "img1.png")  # over twice the limit: PIL raises
    Image.new("RGB", (20, 20)).save(tmp_path / "img2.png")  # between the limit and twice it: PIL only warns
    for name in ("img1.png", "img2.png"):
        with pytest.raises(ValueError, match=f"refusing image {re.escape(str(tmp_path / name))}: .*decompression"):
            open_image(tmp_path / name)
    with pytest.raises(ValueError, match=r"train.json: record 1, sample 1: refusing image .*img1.png"):
        _dataset(tmp_path)[1]
    lenient = _dataset(tmp_path, skip_bad_images=True)
    assert all("input_ids" in lenient[i] for i in range(4))
    assert sorted(lenient.stats.skipped_images) == [1, 2]


def test_skipped_and_truncated_samples_count_once_however_many_epochs(tmp_path):
    records = [_record(0), _record(1), "broken", _record(3, "cat and a cat and a cat")]
    _write_data(tmp_path, records)
    (tmp_path / "img1.png").write_bytes(b"garbage")  # found when read (a missing one is found at load)
    lenient = _dataset(tmp_path, skip_bad_images=True, max_length=28)  # 26 positions fit, 31 do not
    for _epoch in range(3):
        for i in range(len(lenient)):
            lenient[i]
    assert list(lenient.stats.skipped_records) == [2] and list(lenient.stats.skipped_images) == [1]
    assert lenient.stats.skipped == 2
    assert lenient.stats.truncated_records == {3} and lenient.stats.truncated == 1


def test_counts_made_in_data_loader_workers_reach_the_main_process(tmp_path):
    """The shipped recipes load data in worker processes (copies of the dataset): what they skip and truncate must
    still be counted, once, where the report is written."""
    from torch.utils.data import DataLoader

    _write_data(tmp_path, [_record(0), _record(1), _record(2), _record(3, "cat and a cat and a cat")])
    (tmp_path / "img1.png").write_bytes(b"garbage")
    lenient = _dataset(tmp_path, skip_bad_images=True, max_length=28)
    for _epoch in range(2):
        for _ in DataLoader(lenient, batch_size=1, num_workers=2, collate_fn=lambda samples: samples):
            pass
    assert list(lenient.stats.skipped_images) == [1] and lenient.stats.truncated_records == {3}


def test_run_training_reports_each_skipped_sample_once(tmp_path, caplog):
    recipe = _write_run(tmp_path, [_record(0), _record(1), "broken", _record(3), _record(4)])
    (tmp_path / "img1.png").unlink()
    recipe["data"]["skip_bad_images"] = True
    recipe["training"] = {**recipe["training"], "max_steps": 6}  # 3 epochs of 4 usable records in batches of 2
    caplog.set_level(logging.INFO, logger="saisa")
    out = run_training(recipe)
    assert json.loads((out / "training_report.json").read_text())["skipped_samples"] == 2
    assert "skipped 2 sample(s) with a bad image or a broken record" in caplog.text
