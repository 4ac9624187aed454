"""One optimizer step is the same computation however it is split: 1 process x batch 8, 1 process x batch 4 x
accumulation 2, and 2 ranks x batch 4 (torchrun, gloo) give the same loss, grad norm and weights.

The samples differ in length and label count, so only a loss normalised by the label count of the whole step
(transformers' `num_items_in_batch`) passes; a per-micro-batch mean fails.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import torchrun
from safetensors.torch import load_file
from test_training import _write_run

from saisa.training import run_training

STEPS = 3


def _recipe(tmp_path, arch: str, name: str, batch: int, accumulation: int) -> dict:
    recipe = _write_run(tmp_path, arch, samples=8)
    recipe["output_dir"] = str(tmp_path / name)
    # 8 samples and a global batch of 8: every step sees all of them, whatever the order or split.
    recipe["training"] = {
        **recipe["training"],
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": STEPS,
        "save_steps": STEPS,
        "learning_rate": 1e-3,
        "max_grad_norm": 1.0,
    }
    return recipe


def _logs(out) -> list[dict]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_batch_accumulation_and_ranks_give_the_same_step(tmp_path, arch):
    whole = run_training(_recipe(tmp_path, arch, "whole", batch=8, accumulation=1))
    accumulated = run_training(_recipe(tmp_path, arch, "accumulated", batch=4, accumulation=2))

    recipe = _recipe(tmp_path, arch, "ranks", batch=4, accumulation=1)
    (tmp_path / "ranks.yaml").write_text(yaml.safe_dump(recipe))
    run = torchrun("-m", "saisa.cli", "train", str(tmp_path / "ranks.yaml"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = tmp_path / "ranks"

    reference, want_weights = _logs(whole), load_file(whole / "model.safetensors")
    assert len(reference) == STEPS
    print(f"\n{arch}: step losses / grad norms 1x8 {[(e['loss'], e['grad_norm']) for e in reference]}")
    for other in (accumulated, ranks):
        logs, weights = _logs(other), load_file(other / "model.safetensors")
        largest = max(float((weights[key] - value).abs().max()) for key, value in want_weights.items())
        print(f"{arch}: {other.name}: {[(e['loss'], e['grad_norm']) for e in logs]}, max |dw| {largest:.2e}")
        for got, want in zip(logs, reference, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (other.name, got, want)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (other.name, got, want)
        for key, value in want_weights.items():
            torch.testing.assert_close(weights[key], value, atol=2e-6, rtol=1e-5, msg=f"{other.name}: {key}")
