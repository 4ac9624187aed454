"""Training that never reports success on a wrong result: non-finite steps stop it, data that would train on nothing
or read outside the image folder is refused before it starts, and a full disk is named as such."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data_and_recipes import QUESTION, _dataset, _record, _write_data, _write_run

from saisa.training import run_training
from saisa.training.trainer import SaisaTrainer, checkpoint_problem, disk_errors, last_good_checkpoint

# --- non-finite loss and gradients ---------------------------------------------------------------------------------


def _nan_loss_at_step_two(monkeypatch) -> None:
    compute_loss = SaisaTrainer.compute_loss

    def nan_at_step_two(trainer, model, inputs, *args, **kwargs):
        loss = compute_loss(trainer, model, inputs, *args, **kwargs)
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    monkeypatch.setattr(SaisaTrainer, "compute_loss", nan_at_step_two)


def test_a_nan_loss_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    recipe = _write_run(tmp_path)
    recipe["training"] |= {"max_steps": 3, "save_steps": 1}
    _nan_loss_at_step_two(monkeypatch)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 .*nonfinite_patience=0"):
        run_training(recipe)
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    assert not (out / "checkpoint-2").exists()  # no checkpoint holds the step that saw the NaN
    assert checkpoint_problem(out / "checkpoint-1") is None


def test_an_infinite_gradient_stops_training_too(tmp_path, monkeypatch):
    recipe = _write_run(tmp_path)
    training_step = SaisaTrainer.training_step

    def inf_gradient_at_step_two(trainer, model, inputs, *args, **kwargs):
        loss = training_step(trainer, model, inputs, *args, **kwargs)
        if trainer.state.global_step == 1:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(SaisaTrainer, "training_step", inf_gradient_at_step_two)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm at step 2"):
        run_training(recipe)


def test_patience_skips_the_non_finite_step_and_keeps_the_weights_finite(tmp_path, monkeypatch):
    recipe = _write_run(tmp_path)
    recipe["training"] |= {"max_steps": 3, "nonfinite_patience": 1}
    _nan_loss_at_step_two(monkeypatch)
    out = run_training(recipe)
    assert json.loads((out / "training_report.json").read_text())["nonfinite_steps_skipped"] == [2]
    assert all(torch.isfinite(value).all() for value in load_file(out / "model.safetensors").values())
    recipe["training"]["nonfinite_patience"] = -1
    with pytest.raises(ValueError, match=r"nonfinite_patience must be an integer >= 0, got -1"):
        run_training(recipe)


def test_under_deepspeed_a_non_finite_step_stops_whatever_the_patience():
    """DeepSpeed's engine has applied the update before the guard runs: skipping is impossible there, so patience
    would let NaN weights train on and be saved with exit 0."""
    from types import SimpleNamespace

    from saisa.training.trainer import NonFiniteGuard

    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()

    def guard(deepspeed: bool) -> NonFiniteGuard:
        trainer = SimpleNamespace(
            model_wrapped=model, is_deepspeed_enabled=deepspeed, step_loss_finite=torch.tensor(False)
        )
        return NonFiniteGuard(trainer, patience=3)

    args, state = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=6)
    guard(deepspeed=False).on_pre_optimizer_step(args, state, None)  # skipped: within patience
    assert model.weight.grad is None
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7 .*DeepSpeed cannot honour"):
        guard(deepspeed=True).on_pre_optimizer_step(args, state, None)


# --- data refused before training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [0, -5, 2.5, True, "64"])
def test_max_length_must_be_a_positive_integer(tmp_path, max_length):
    _write_data(tmp_path, [_record(0)])
    with pytest.raises(
        ValueError, match=r"data.max_length must be a positive integer .*got " + re.escape(repr(max_length))
    ):
        _dataset(tmp_path, max_length=max_length)


def test_max_length_must_hold_an_image_and_the_template(tmp_path):
    _write_data(tmp_path, [_record(0)])
    with pytest.raises(ValueError, match=r"data.max_length=16 is shorter than one image \(16 positions\) plus"):
        _dataset(tmp_path, max_length=16)
    # the shortest that does: the image, the template's tokens and one answer token
    needed = int(re.search(r"at least (\d+)", _error(lambda: _dataset(tmp_path, max_length=16))).group(1))
    assert needed > 17
    assert len(_dataset(tmp_path, max_length=needed + 8)) == 1


def _error(call) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    return str(caught.value)


def _long_question(i: int) -> dict:
    question = {"from": "human", "value": " ".join(["what is this ?"] * 6)}
    return {"id": f"long{i}", "conversations": [question, {"from": "gpt", "value": "a cat"}]}


def test_samples_that_keep_no_answer_token_are_counted_and_named(tmp_path):
    short = {"id": "short", "conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "a cat"}]}
    _write_data(tmp_path, [_long_question(0), short, _long_question(2)])
    message = _error(lambda: _dataset(tmp_path, max_length=12))
    assert "2 of 3 samples keep no answer token after truncation to data.max_length=12" in message
    assert "record 0, sample long0; " in message and "record 2, sample long2" in message
    lenient = _dataset(tmp_path, max_length=12, skip_bad_images=True)
    assert lenient.record_indices == [1] and sorted(lenient.stats.skipped_records) == [0, 2]
    assert (lenient[0]["labels"] != -100).any()


def test_a_max_length_that_truncates_every_answer_away_fails_before_training(tmp_path, caplog):
    """Trained on, it would give loss 0.0 and exit 0, the initial weights saved as the trained model."""
    recipe = _write_run(tmp_path, [_long_question(i) for i in range(4)])
    recipe["data"]["max_length"] = 12
    caplog.set_level(logging.INFO, logger="saisa")
    with pytest.raises(ValueError, match=r"4 of 4 samples keep no answer token"):
        run_training(recipe)
    assert "saved the trained model" not in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_every_missing_image_is_counted_before_training(tmp_path):
    _write_data(tmp_path, [_record(i) for i in range(4)])
    (tmp_path / "img1.png").unlink()
    (tmp_path / "img3.png").unlink()
    with pytest.raises(FileNotFoundError) as missing:
        _dataset(tmp_path)
    message = str(missing.value)
    assert f"2 of 4 samples name an image that is not in {tmp_path}" in message
    assert f"record 1, sample 1: {tmp_path / 'img1.png'}; " in message and "record 3, sample 3" in message
    lenient = _dataset(tmp_path, skip_bad_images=True)
    assert lenient.record_indices == [0, 2] and lenient.stats.skipped == 2


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_image_paths_stay_in_the_image_folder_unless_allowed(tmp_path, where):
    folder = tmp_path / "images"
    folder.mkdir()
    _write_data(tmp_path, [])
    name = "../img0.png" if where == "parent" else str(tmp_path / "img0.png")
    records = [{"id": "out", "image": name, "conversations": [QUESTION, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    kwargs = {"json_path": tmp_path / "train.json", "image_folder": folder, "template": "tokenizer"}
    from conftest import tiny_processor

    from saisa.training.data import LlavaJsonDataset

    with pytest.raises(ValueError, match=re.escape(f"sample out: image path {name!r} leaves the image folder")):
        LlavaJsonDataset(processor=tiny_processor(), tokens_per_image=16, **kwargs)
    allowed = LlavaJsonDataset(processor=tiny_processor(), tokens_per_image=16, allow_external_images=True, **kwargs)
    assert allowed[0]["pixel_values"].shape[0] == 1


# --- a full disk ---------------------------------------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_nothing_to_trust(tmp_path, monkeypatch):
    recipe = _write_run(tmp_path)
    recipe["training"] |= {"max_steps": 4, "save_steps": 2}
    real_save = torch.save

    def full_at_step_four(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            Path(f).write_bytes(b"PK")  # what was written before the disk filled up
            f = _FullDisk()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_four)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=f"no space left on device while writing {re.escape(str(out))}/checkpoint-4") as e:
        run_training(recipe)
    assert e.value.errno == errno.ENOSPC
    assert not (out / "checkpoint-4").exists()  # removed: space freed, nothing half-written to resume from
    assert last_good_checkpoint(out) == out / "checkpoint-2"


def test_torchs_own_report_of_a_short_write_is_named_as_a_full_disk(tmp_path):
    """torch's zip writer reports a write that hit ENOSPC only as "enforce fail ... unexpected pos" (seen writing to
    /dev/full); the half-written checkpoint folder goes."""
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"PK")
    with pytest.raises(OSError, match=f"no space left on device while writing {re.escape(str(folder))}"):
        with disk_errors(folder, remove_on_failure=True):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="something else"):  # other errors pass through untouched
        with disk_errors(tmp_path, remove_on_failure=True):
            raise RuntimeError("something else")
    assert tmp_path.exists()


def test_a_full_disk_during_the_final_save_is_named(tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    real_save = transformers.modeling_utils.safe_save_file

    def storage_full(tensors, filename, *args, **kwargs):  # what safetensors raises on ENOSPC, in the final save only
        if "checkpoint-" in str(filename):  # the run's last checkpoint is saved (on a disk with room) first
            return real_save(tensors, filename, *args, **kwargs)
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    recipe = _write_run(tmp_path)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", storage_full)
    with pytest.raises(OSError, match=f"no space left on device while writing {re.escape(str(tmp_path / 'out'))}") as e:
        run_training(recipe)
    assert f"{tmp_path / 'out'} may hold a partial save" in str(e.value)  # the output folder is kept
    assert "checkpoint-" not in str(e.value) and (tmp_path / "out" / "checkpoint-2" / "CHECKPOINT_COMPLETE").is_file()
