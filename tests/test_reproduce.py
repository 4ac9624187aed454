"""`saisa reproduce` compares the architectures under one training policy (the paper's): the same kinds of parameters
train in each stage for SAISA, LLaVA-1.5 and NAAViT. Checked on what training really changed, not on flags."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_training import _write_run

from saisa.commands.reproduce import ARCHS, paper_policy
from saisa.training import load_recipe, run_training


def _kind(name: str) -> str:
    if name.startswith(("projector.", "layer_projectors.")):
        return "projector"
    if name.startswith("language_model."):
        return "llm"
    assert name.startswith("vision_tower."), name
    return "vision"


def _changed(before: dict, after: dict) -> dict[str, set[str]]:
    """kind -> names of the tensors a stage changed; every name in `after` is accounted for."""
    kinds: dict[str, set[str]] = {}
    for name, tensor in after.items():
        if name not in before or not torch.equal(before[name], tensor):
            kinds.setdefault(_kind(name), set()).add(name)
    return kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_the_same_kinds_per_stage(tmp_path, arch):
    base = _write_run(tmp_path, arch, shared_projector=arch == "saisa")
    before = load_file(tmp_path / "init" / "model.safetensors")
    common = [
        f"architecture={arch}",
        f"data.train={base['data']['train']}",
        f"data.image_folder={tmp_path}",
        "data.template=tokenizer",
        "training.max_steps=2",
        "training.learning_rate=0.01",
        "training.per_device_train_batch_size=4",
    ]
    align = run_training(
        load_recipe(
            "embedded-align",
            common
            + [f"model.init={tmp_path / 'init'}", f"output_dir={tmp_path / 'align'}", *paper_policy(arch, "align")],
        )
    )
    aligned = load_file(align / "model.safetensors")
    assert set(_changed(before, aligned)) == {"projector"}
    instruct = run_training(
        load_recipe(
            "embedded-instruct",
            common + [f"model.init={align}", f"output_dir={tmp_path / 'instruct'}", *paper_policy(arch, "instruct")],
        )
    )
    tuned = load_file(instruct / "model.safetensors")
    changed = _changed(aligned, tuned)
    assert set(changed) == {"projector", "llm"}
    llm = {name for name in tuned if _kind(name) == "llm"}
    assert changed["llm"] == llm  # the whole LLM, not an adapter: every tensor moved
    assert not any("lora" in name for name in tuned)


def test_report_states_each_seed_and_the_mean_and_flags_a_grid_edge():
    from saisa.commands.reproduce import markdown

    def arch(accuracies, lr):
        return {
            "accuracy_per_seed": accuracies,
            "accuracy_mean": sum(accuracies) / 3,
            "accuracy_std": float(torch.tensor(accuracies).std()),
            "blind_accuracy_per_seed": [0.1, 0.0, 0.1],
            "instruct_learning_rate": lr,
            "learning_rate_sweep": [
                {"learning_rate": 1e-5, "val_accuracy": 0.3},
                {"learning_rate": 3e-5, "val_accuracy": 0.4},
            ],
            "trainable_parameters": {"align": 10, "instruct": 100},
            "train_time_s_per_seed": [60.0, 61.0, 62.0],
        }

    point = {"saisa": {"prompt_text_tokens": 40}, "visual_tokens": 49}
    point.update(prefill_flops_ratio=0.7, analytic_prefill_flops_ratio=0.7, ttft_ratio=0.9, train_step_ratio=0.85)
    result = {
        "command": "saisa reproduce",
        "wall_time_s": 60.0,
        "note": "operator's note",
        "main": {
            "visual_tokens": 49,
            "seeds": [0, 1, 2],
            "architectures": {
                "saisa": arch([0.5, 0.4, 0.6], 3e-5),
                "llava": arch([0.3, 0.2, 0.4], 2e-5),
                "naavit": arch([0.3, 0.3, 0.3], 2e-5),
            },
            "data": {
                "align_samples": 1,
                "instruct_samples": 1,
                "val_questions": 1,
                "test_questions": 1,
                "batch_size": 4,
                "align_learning_rate": 1e-3,
                "instruct_learning_rate_grid": [1e-5, 2e-5, 3e-5],
            },
        },
        "efficiency_curve": [point],
    }
    text = markdown(result)
    assert "| saisa | 50.0 ± 10.0% | 50.0 / 40.0 / 60.0 |" in text  # sample standard deviation of the seeds
    assert "SAISA +20.0 points and NAAViT +0.0 points against LLaVA-1.5" in text
    assert "operator's note" in text
    assert "at the edge of the grid for saisa: a wider grid" in text  # llava/naavit chose 2e-5, inside the grid
