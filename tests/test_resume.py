"""Resume is exact everywhere: in any epoch after a kill -9, after a crash mid-rotation, past a broken checkpoint,
and on a run that already finished."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from saisa.training import run_training
from saisa.training.trainer import COMPLETE_MARKER, EpochSeededLengthGroupedSampler, SaisaTrainer

SAMPLES = 8  # batch 4: 2 steps an epoch, 3 epochs; checkpoints every 3 steps, so checkpoint-3 is mid-epoch 2
KILL_AT_STEP = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Eight samples of equal (estimated) length, each with its own image and answer, so their order matters."""
    folder = tmp_path_factory.mktemp("run")
    processor = tiny_processor()
    model = tiny_model(image_token_id=processor.image_token_id)
    model.save_pretrained(folder / "init")
    processor.save_pretrained(folder / "init")
    rng = np.random.default_rng(0)
    records = []
    for i in range(SAMPLES):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        answer = ["a cat", "cat a", "is a", "a is"][i % 4]
        records.append(
            {
                "id": str(i),
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is this ?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    (folder / "train.json").write_text(json.dumps(records))
    return {
        "architecture": "saisa",
        "stage": "instruct",
        "model": {"init": str(folder / "init")},
        "data": {"train": str(folder / "train.json"), "image_folder": str(folder), "template": "tokenizer"},
        "output_dir": str(folder / "uninterrupted"),
        "training": {
            "per_device_train_batch_size": 4,
            "num_train_epochs": 3,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": None,
            "seed": 0,
            "group_by_length": True,
        },
    }


@pytest.fixture(scope="module")
def uninterrupted(run) -> dict[str, torch.Tensor]:
    return _final_weights(run)


def _recipe(run: dict, output_dir, **training) -> dict:
    return {**run, "output_dir": str(output_dir), "training": {**run["training"], **training}}


def _final_weights(recipe: dict, **kwargs) -> dict[str, torch.Tensor]:
    return load_file(run_training(recipe, **kwargs) / "model.safetensors")


def _assert_identical(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _marked(out) -> list[str]:
    return sorted(p.parent.name for p in out.glob(f"checkpoint-*/{COMPLETE_MARKER}"))


KILL_SCRIPT = f"""
import json, os, signal, sys
from transformers import TrainerCallback
from saisa.training import run_training

class KillNine(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {KILL_AT_STEP}:
            os.kill(os.getpid(), signal.SIGKILL)

run_training(json.loads(sys.argv[1]), callbacks=[KillNine()])
"""


def test_kill_nine_in_epoch_two_then_resume_gives_bit_identical_weights(tmp_path, run, uninterrupted):
    recipe = _recipe(run, tmp_path / "out")
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(recipe)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "out"
    assert _marked(out) == ["checkpoint-3"] and not (out / "model.safetensors").exists()
    _assert_identical(_final_weights(recipe, resume=True), uninterrupted)


def test_the_length_grouped_order_depends_on_seed_and_epoch_only():
    lengths = [5, 3, 9, 9, 1, 4, 7, 2] * 4
    rank0, rank1 = (EpochSeededLengthGroupedSampler(4, lengths, seed=7) for _ in range(2))
    first = list(rank0)
    torch.manual_seed(123)  # the global RNG plays no part
    rank1.set_epoch(0)
    assert list(rank1) == first
    rank0.set_epoch(1)
    rank1.set_epoch(1)
    assert list(rank0) == list(rank1) != first and sorted(first) == list(range(len(lengths)))


def test_a_crash_between_save_and_marker_keeps_the_previous_checkpoint(tmp_path, run, uninterrupted, monkeypatch):
    recipe = _recipe(run, tmp_path / "out", save_total_limit=1)
    mark_complete = SaisaTrainer._mark_complete

    def crash_at_step_six(trainer, folder):
        if trainer.state.global_step == 6:
            raise RuntimeError("crashed after the files of checkpoint-6, before its marker")
        mark_complete(trainer, folder)

    monkeypatch.setattr(SaisaTrainer, "_mark_complete", crash_at_step_six)
    with pytest.raises(RuntimeError, match="before its marker"):
        run_training(recipe)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert _marked(out) == ["checkpoint-3"] and (out / "checkpoint-6" / "trainer_state.json").exists()
    _assert_identical(_final_weights(recipe, resume=True), uninterrupted)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"] and _marked(out) == ["checkpoint-6"]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, run, uninterrupted, capsys):
    recipe = _recipe(run, tmp_path / "out")
    out = tmp_path / "out"
    shutil.copytree(run["output_dir"], out)
    (out / "model.safetensors").unlink()  # killed before the final save
    broken = out / "checkpoint-6" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:1000])
    capsys.readouterr()
    resumed = _final_weights(recipe, resume=True)
    printed = capsys.readouterr().out
    assert f"cannot resume from checkpoint-6, {broken}: " in printed, printed
    assert f"resuming from {out / 'checkpoint-3'}" in printed, printed
    _assert_identical(resumed, uninterrupted)


def test_nothing_usable_starts_afresh(tmp_path, run, uninterrupted, capsys):
    recipe = _recipe(run, tmp_path / "out")
    out = tmp_path / "out"
    shutil.copytree(run["output_dir"], out)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    capsys.readouterr()
    resumed = _final_weights(recipe, resume=True)
    printed = capsys.readouterr().out
    for broken in (out / "checkpoint-3" / "trainer_state.json", out / "checkpoint-6" / "optimizer.pt"):
        assert f"{broken}: " in printed, printed
    assert f"no usable checkpoint in {out}: starting afresh" in printed, printed
    _assert_identical(resumed, uninterrupted)


def test_a_finished_max_steps_run_resumed_trains_no_further(tmp_path, run):
    recipe = _recipe(run, tmp_path / "out", max_steps=3)  # ends mid-epoch 2, at its last checkpoint
    out = tmp_path / "out"
    finished = _final_weights(recipe)
    (out / "model.safetensors").unlink()
    _assert_identical(_final_weights(recipe, resume=True), finished)
    report = json.loads((out / "training_report.json").read_text())
    assert max(step for step, _ in report["losses"]) == 3
    assert _marked(out) == ["checkpoint-3"]


def test_deepspeed_states_in_subfolders_are_checked_too(tmp_path):
    """ZeRO checkpoints keep model and optimizer shards in global_stepN/: a truncated shard is found there, pickled
    top-level files such as training_args.bin are not mistaken for broken ones."""
    from saisa.training.trainer import unreadable_file

    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    torch.save({"args": argparse.Namespace(lr=1.0)}, checkpoint / "training_args.bin")
    shard = checkpoint / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"state": torch.ones(1000), "config": argparse.Namespace(stage=3)}, shard)
    assert unreadable_file(checkpoint) is None
    shard.write_bytes(shard.read_bytes()[:500])
    assert unreadable_file(checkpoint).startswith(f"{shard}: ")
