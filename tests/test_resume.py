"""Resume is exact everywhere: in any epoch after a kill -9, after a crash mid-rotation, past a broken checkpoint,
and on a run that already finished."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from saisa.training import run_training
from saisa.training.trainer import COMPLETE_MARKER, CheckpointError, EpochSeededLengthGroupedSampler, SaisaTrainer

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


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, run, uninterrupted, caplog):
    recipe = _recipe(run, tmp_path / "out")
    out = tmp_path / "out"
    shutil.copytree(run["output_dir"], out)
    (out / "model.safetensors").unlink()  # killed before the final save
    broken = out / "checkpoint-6" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:1000])
    caplog.set_level(logging.INFO, logger="saisa")
    resumed = _final_weights(recipe, resume=True)
    assert f"cannot resume from checkpoint-6: {broken}: 1000 bytes where the manifest says" in caplog.text
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text, caplog.text
    _assert_identical(resumed, uninterrupted)


def test_nothing_usable_is_refused_naming_every_damaged_file(tmp_path, run, uninterrupted, capsys):
    recipe = _recipe(run, tmp_path / "out")
    out = tmp_path / "out"
    shutil.copytree(run["output_dir"], out)
    (out / "model.safetensors").unlink()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed") as refused:
        run_training(recipe, resume=True)
    for broken in (out / "checkpoint-3" / "trainer_state.json", out / "checkpoint-6" / "optimizer.pt"):
        assert f"{broken}: " in str(refused.value)
    assert "Run without --resume to start afresh" in str(refused.value)
    assert not (out / "model.safetensors").exists()
    from saisa.cli import main

    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "recipe.yaml")]) == 2  # the recipe, not a resume mode
    shown = capsys.readouterr().err
    assert f"saisa train: error: no checkpoint in {out} can be resumed" in shown
    # the run's own lines reach the user too, logged by the library and shown by the verb
    assert "engine: single process on cpu" in shown and "cannot resume from checkpoint-6" in shown, shown


def test_resume_modes_on_the_command_line():
    from saisa.cli.train import recipe_and_resume_mode

    assert recipe_and_resume_mode("r.yaml", None) == ("r.yaml", None)
    assert recipe_and_resume_mode("r.yaml", "full") == ("r.yaml", "full")
    assert recipe_and_resume_mode(None, "r.yaml") == ("r.yaml", "full")
    assert recipe_and_resume_mode("r.yaml", "weights-only") == ("r.yaml", "weights-only")
    with pytest.raises(ValueError, match="--resume takes no value or weights-only, got 'weights'"):
        recipe_and_resume_mode("r.yaml", "weights")


def test_a_finished_max_steps_run_resumed_trains_no_further(tmp_path, run):
    recipe = _recipe(run, tmp_path / "out", max_steps=3)  # ends mid-epoch 2, at its last checkpoint
    out = tmp_path / "out"
    finished = _final_weights(recipe)
    (out / "model.safetensors").unlink()
    _assert_identical(_final_weights(recipe, resume=True), finished)
    report = json.loads((out / "training_report.json").read_text())
    assert max(step for step, _ in report["losses"]) == 3
    assert _marked(out) == ["checkpoint-3"]


def _fake_checkpoint(folder, *, deepspeed: bool):
    """A checkpoint laid out as DeepSpeed (global_stepN/ shards) or FSDP2 (pytorch_model_fsdp_0/, optimizer_0/)
    checkpoints are, completed by the trainer's own manifest and marker."""
    from saisa.training.trainer import write_atomically, write_manifest

    inner = "global_step4" if deepspeed else "optimizer_0"
    (folder / inner).mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "rng_state_0.pth").write_bytes(b"rng")
    torch.save({"args": argparse.Namespace(lr=1.0)}, folder / "training_args.bin")
    shard = folder / inner / ("zero_pp_rank_0_mp_rank_00_optim_states.pt" if deepspeed else "__0_0.distcp")
    torch.save({"state": torch.ones(1000)}, shard)
    if not deepspeed:
        (folder / "pytorch_model_fsdp_0").mkdir()
        (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"weights" * 100)
        (folder / "scheduler.pt").write_bytes(b"scheduler")
    digest = write_manifest(folder)
    write_atomically(folder / COMPLETE_MARKER, json.dumps({"step": 4, "manifest_sha256": digest}).encode())
    return shard


@pytest.mark.parametrize("deepspeed", [True, False], ids=["deepspeed", "fsdp2"])
def test_sharded_states_in_subfolders_are_in_the_manifest(tmp_path, deepspeed):
    """ZeRO and FSDP2 checkpoints keep their shards in subfolders: each is listed, sized and hashed; DeepSpeed's
    optimizer states count as the optimizer state (its scheduler may live inside them)."""
    from saisa.training.trainer import MANIFEST, checkpoint_problem

    checkpoint = tmp_path / "checkpoint-4"
    shard = _fake_checkpoint(checkpoint, deepspeed=deepspeed)
    assert shard.relative_to(checkpoint).as_posix() in json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert checkpoint_problem(checkpoint) is None
    content = bytearray(shard.read_bytes())
    content[100:164] = bytes(b ^ 0xFF for b in content[100:164])
    shard.write_bytes(bytes(content))
    assert checkpoint_problem(checkpoint, full=False) is None  # same size: only the hash shows it
    assert checkpoint_problem(checkpoint).startswith(f"{shard}: its SHA-256 differs")
    shard.write_bytes(bytes(content[:500]))
    assert checkpoint_problem(checkpoint, full=False).startswith(f"{shard}: 500 bytes where the manifest says")


def _flip_64_bytes(path) -> None:
    content = bytearray(path.read_bytes())
    start = max(0, len(content) // 2 - 32)
    content[start : start + 64] = bytes(b ^ 0xFF for b in content[start : start + 64])
    path.write_bytes(bytes(content))


DAMAGES = {
    "deleted": lambda path: path.unlink(),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "bit-flipped": _flip_64_bytes,
}


@pytest.fixture(scope="module")
def every_two_steps(run, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run checkpointed at steps 2, 4 and 6, and its final weights: damage to checkpoint-4 then matters."""
    recipe = _recipe(run, tmp_path_factory.mktemp("every_two") / "out", save_steps=2)
    return recipe, _final_weights(recipe)


def _interrupted_after_step_five(recipe: dict, out) -> dict:
    """A copy of the finished run as a kill after step 5 leaves it: checkpoints 2 and 4, no final model."""
    shutil.copytree(recipe["output_dir"], out)
    shutil.rmtree(out / "checkpoint-6")
    (out / "model.safetensors").unlink()
    return {**recipe, "output_dir": str(out)}


@pytest.mark.parametrize("damage", DAMAGES)
def test_any_file_of_the_last_checkpoint_damaged_is_named_and_skipped(tmp_path, every_two_steps, damage, caplog):
    """The matrix: each file of the last checkpoint deleted, truncated or with 64 bytes flipped is found by the
    resume check, named, and the previous checkpoint chosen (end-to-end resumes of such cases: the next test)."""
    from saisa.training.trainer import MANIFEST, last_good_checkpoint

    recipe, _ = every_two_steps
    last = Path(recipe["output_dir"]) / "checkpoint-4"
    names = sorted(p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file())
    essential = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert essential | {MANIFEST, COMPLETE_MARKER} <= set(names), names
    for number, name in enumerate(names):
        out = _interrupted_after_step_five(recipe, tmp_path / str(number))["output_dir"]
        damaged = Path(out) / "checkpoint-4" / name
        DAMAGES[damage](damaged)
        caplog.clear()
        assert last_good_checkpoint(out) == Path(out) / "checkpoint-2", name
        assert f"cannot resume from checkpoint-4: {damaged}: " in caplog.text, (name, caplog.text)
        shutil.rmtree(out)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("optimizer.pt", "deleted"),
        ("scheduler.pt", "deleted"),
        ("optimizer.pt", "bit-flipped"),
        ("model.safetensors", "bit-flipped"),
    ],
)
def test_a_damaged_last_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, every_two_steps, name, damage):
    """Falling back to checkpoint-2 and redoing steps 3-6 gives the uninterrupted weights bit for bit, where resuming
    from the damaged checkpoint-4 would continue without its optimizer or scheduler state, or from corrupted weights."""
    recipe, expected = every_two_steps
    resumed = _interrupted_after_step_five(recipe, tmp_path / "out")
    DAMAGES[damage](tmp_path / "out" / "checkpoint-4" / name)
    _assert_identical(_final_weights(resumed, resume=True), expected)


def test_weights_only_resumes_a_checkpoint_without_its_optimizer_state(tmp_path, every_two_steps, caplog):
    """A checkpoint saved without optimizer state (or with a damaged one) is refused by a full resume; asked for,
    `weights-only` continues from its weights and step with a fresh optimizer, the damaged file never read."""
    from saisa.training.trainer import checkpoint_problem, write_atomically, write_manifest

    recipe, expected = every_two_steps
    resumed = _interrupted_after_step_five(recipe, tmp_path / "out")
    out = tmp_path / "out"
    shutil.rmtree(out / "checkpoint-2")
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # as `save_only_model` writes it
    digest = write_manifest(out / "checkpoint-4")
    write_atomically(
        out / "checkpoint-4" / COMPLETE_MARKER, json.dumps({"step": 4, "manifest_sha256": digest}).encode()
    )
    problem = checkpoint_problem(out / "checkpoint-4")
    assert "optimizer.pt: not in the checkpoint (saved without its optimizer state)" in problem
    assert "--resume weights-only" in problem
    with pytest.raises(CheckpointError, match="optimizer.pt: not in the checkpoint"):
        run_training(resumed, resume=True)
    _flip_64_bytes(out / "checkpoint-4" / "rng_state.pth")  # weights-only neither checks nor reads it
    caplog.set_level(logging.INFO, logger="saisa")
    weights = _final_weights(resumed, resume="weights-only")
    assert f"resuming from {out / 'checkpoint-4'} (weights only" in caplog.text
    losses = json.loads((out / "training_report.json").read_text())["losses"]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]  # 1-4 logged before the checkpoint, 5-6 now
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert any(not torch.equal(weights[key], expected[key]) for key in expected)  # a fresh optimizer: another path


def test_only_a_first_save_cut_short_starts_afresh(tmp_path):
    """Nothing was ever completed (no marker, no manifest): nothing to lose, so `--resume` starts afresh."""
    from saisa.training.trainer import last_good_checkpoint

    assert last_good_checkpoint(tmp_path / "absent") is None
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"half")
    assert last_good_checkpoint(tmp_path) is None


def test_files_added_or_swapped_for_links_after_the_save_are_refused(tmp_path, every_two_steps, caplog):
    """A consolidated model file added to a checkpoint would be loaded in place of its own weights (transformers
    prefers it to a sharded index), so a file the manifest does not list is refused like a damaged one; a listed file
    replaced by a link to another checkpoint's copy is caught by its hash."""
    from saisa.training.trainer import last_good_checkpoint

    recipe, _ = every_two_steps
    out = Path(_interrupted_after_step_five(recipe, tmp_path / "added")["output_dir"])
    added = out / "checkpoint-4" / "pytorch_model.bin"
    shutil.copy(out / "checkpoint-2" / "model.safetensors", added)
    assert last_good_checkpoint(out) == out / "checkpoint-2"
    assert f"cannot resume from checkpoint-4: {added}: not in the manifest" in caplog.text
    caplog.clear()
    assert last_good_checkpoint(out, "weights-only") == out / "checkpoint-2"
    added.unlink()
    assert last_good_checkpoint(out) == out / "checkpoint-4"

    linked = out / "checkpoint-4" / "model.safetensors"
    linked.unlink()
    linked.symlink_to(out / "checkpoint-2" / "model.safetensors")
    caplog.clear()
    assert last_good_checkpoint(out) == out / "checkpoint-2"
    assert f"{linked}: " in caplog.text


def test_a_file_that_cannot_be_read_is_named_and_skipped(tmp_path, every_two_steps, caplog, monkeypatch):
    """An I/O or permission error while verifying is a reason to fall back like any damage, not a traceback (tests
    run as root, where chmod does not deny reading: the read itself fails here)."""
    import errno

    from saisa.training import trainer
    from saisa.training.trainer import last_good_checkpoint

    recipe, _ = every_two_steps
    out = Path(_interrupted_after_step_five(recipe, tmp_path / "out")["output_dir"])
    unreadable = out / "checkpoint-4" / "optimizer.pt"
    sha256 = trainer._sha256

    def denied(path):
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return sha256(path)

    monkeypatch.setattr(trainer, "_sha256", denied)
    assert last_good_checkpoint(out) == out / "checkpoint-2"
    assert f"cannot resume from checkpoint-4: {unreadable}: unreadable (Permission denied)" in caplog.text
