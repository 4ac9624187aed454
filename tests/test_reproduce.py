"""`saisa reproduce` compares the architectures under one training policy (the paper's): the same kinds of parameters
train in each stage for SAISA, LLaVA-1.5 and NAAViT. Checked on what training really changed, not on flags."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import _write_run

from saisa.experiments.reproduce import ARCHS, PAPER, ReproduceSettings, paper_policy, reproduce
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


def _task_result(accuracies: dict[str, list[float]], lrs: dict[str, float], curves: dict[str, list[float]]) -> dict:
    """One task's section of reproduction.json, as `train_and_evaluate` writes it."""

    def arch(name):
        per_seed = accuracies[name]
        curve = [{"step": 10 * i, "accuracy": a} for i, a in enumerate(curves[name])]
        return {
            "accuracy_per_seed": per_seed,
            "accuracy_mean": sum(per_seed) / len(per_seed),
            "accuracy_std": float(torch.tensor(per_seed).std()),
            "blind_accuracy_per_seed": [0.1, 0.0, 0.1],
            "instruct_learning_rate": lrs[name],
            "learning_rate_sweep": [
                {"learning_rate": 1e-5, "val_accuracy": 0.3, "validation_curve": curve},
                {"learning_rate": 3e-5, "val_accuracy": 0.4, "validation_curve": curve},
                {"learning_rate": 2e-5, "val_accuracy": 0.4, "validation_curve": curve},
            ],
            "trainable_parameters": {"align": 10, "instruct": 100 if name != "saisa" else 123},
            "train_time_s_per_seed": [60.0, 61.0, 62.0],
        }

    def comparison(first_only, second_only, p):
        per_seed = [
            {"first_only": 3, "second_only": 1, "questions": 100, "accuracy_difference": d} for d in (0.02, -0.01)
        ]
        return {"first_only": first_only, "second_only": second_only, "pairs": 300, "p_value": p, "per_seed": per_seed}

    return {
        "description": "Some images and their questions",
        "visual_tokens": 49,
        "seeds": [0, 1, 2],
        "architectures": {name: arch(name) for name in ARCHS},
        "significance": {"saisa_vs_llava": comparison(40, 10, 1.2e-5), "naavit_vs_llava": comparison(11, 12, 1.0)},
        "data": {
            "align_samples": 96,
            "instruct_samples": 52,
            "align_steps": 24,
            "instruct_steps": 13,
            "val_questions": 26,
            "test_questions": 39,
            "batch_size": 4,
            "align_learning_rate": 1e-3,
            "instruct_learning_rate_grid": [1e-5, 2e-5, 3e-5],
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.03,
        },
    }


def _result(tasks: dict) -> dict:
    point = {"saisa": {"prompt_text_tokens": 40}, "visual_tokens": 49, "image_size": 224}
    point.update(prefill_flops_ratio=0.7, analytic_prefill_flops_ratio=0.7, ttft_ratio=0.9, train_step_ratio=0.85)
    return {
        "command": "saisa reproduce",
        "wall_time_s": 60.0,
        "note": "operator's note",
        "setup": {"llm": "LLM", "vision": "encoder", "device": "cpu", "dtype": "float32"}
        | {"timing_samples": 4, "timing_repeats": 7},
        "paper": PAPER | {"prefill_flops_ratio": 0.123, "llm": "Paper-LLM"},  # read from the JSON, not typed
        "tasks": tasks,
        "efficiency_curve": [point],
    }


def test_report_states_each_task_seed_curve_and_paired_test(tmp_path):
    from saisa.experiments.report import write_report

    first = _task_result(
        {"saisa": [0.5, 0.4, 0.6], "llava": [0.3, 0.2, 0.4], "naavit": [0.3, 0.3, 0.3]},
        {"saisa": 3e-5, "llava": 2e-5, "naavit": 2e-5},
        {"saisa": [0.0, 0.2, 0.5, 0.55], "llava": [0.0, 0.1, 0.3, 0.3], "naavit": [0.0, 0.1, 0.2, 0.25]},
    )
    second = _task_result(
        {"saisa": [0.9, 0.9, 0.9], "llava": [0.8, 0.8, 0.8], "naavit": [0.7, 0.7, 0.7]},
        {"saisa": 2e-5, "llava": 2e-5, "naavit": 2e-5},
        {"saisa": [0.0, 0.5, 0.9, 0.9], "llava": [0.0, 0.4, 0.8, 0.8], "naavit": [0.0, 0.3, 0.7, 0.7]},
    )
    text = write_report(_result({"first-task": first, "second-task": second}), tmp_path)
    assert (tmp_path / "reproduction.md").read_text() == text
    assert (tmp_path / "reproduction.png").stat().st_size and (tmp_path / "reproduction_curves.png").stat().st_size
    assert "## Task: first-task" in text and "## Task: second-task" in text
    assert "Some images and their questions: 96 align captions (24 steps), 52 instruct questions (13 steps)" in text
    assert "| saisa | 50.0 ± 10.0% | 50.0 / 40.0 / 60.0 |" in text  # sample standard deviation of the seeds
    assert "SAISA +20.0 points and NAAViT +0.0 points against LLaVA-1.5" in text
    # the curve of each architecture's chosen learning rate, step by step, and its last half's change
    assert "| 10 | 20.0% | 10.0% | 10.0% |" in text and "| 30 | 55.0% | 30.0% | 25.0% |" in text
    assert "accuracy moved by +5.0 / +0.0 / +5.0 points (saisa / llava / naavit)" in text
    # the paired test, pooled and per seed
    assert "| saisa vs llava | 40 / 10 of 300 pairs | 1.2e-05 | +2.0 / -1.0 |" in text
    assert "SAISA vs LLaVA: p = 1.2e-05, significant at the 5% level." in text
    assert "NAAViT vs LLaVA: p = 1, not significant at the 5% level." in text
    assert "SAISA's instruct stage trains 1.23x LLaVA's" in text  # the trainable-parameter ratio
    assert "operator's note" in text
    assert "its 0.12x is at v = 576" in text and "at Paper-LLM" in text and "LLM + encoder at 224 px" in text
    assert "at the edge of the grid for saisa: a wider grid" in text  # llava/naavit chose 2e-5, inside the grid


def test_quick_gives_the_first_comparisons_settings():
    import argparse

    from saisa.cli import settings_from
    from saisa.cli.reproduce import add_arguments
    from saisa.experiments.reproduce import ReproduceSettings, _settings_argv, effective

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = effective(settings_from(ReproduceSettings, parser.parse_args([])))
    assert list(default.tasks) == ["fashion-mnist", "easy-vqa"] and len(default.seeds) >= 5
    quick = effective(settings_from(ReproduceSettings, parser.parse_args(["--quick", "--seeds", "7"])))
    # the command that wrote the first docs/reproduction.md, plus the task list and the curve it now records
    first = (
        "--image-size 224 --align-per-class 30 --instruct-per-class 30 --val-per-class 10 --test-per-class 20 "
        "--batch-size 4 --align-lr 0.001 --instruct-lrs 2e-05 0.0001 --seeds 0 1 2"
    )
    argv = " ".join(_settings_argv(quick))
    assert argv.startswith("--tasks fashion-mnist --image-size 224 ")
    assert argv.replace("--tasks fashion-mnist ", "").replace(f" --curve-points {quick.curve_points}", "") == first


def test_validation_curve_measures_at_even_steps_and_leaves_training_as_it_was():
    from types import SimpleNamespace

    from saisa.experiments.reproduce import ValidationCurve

    model = torch.nn.Linear(2, 2)
    seen_modes = []

    def measure(m):
        seen_modes.append(m.training)
        torch.rand(3)  # a measurement that draws random numbers must not move training's
        return len(seen_modes) / 10

    curve = ValidationCurve(measure, points=4)
    state = SimpleNamespace(max_steps=10, global_step=0)
    model.train()
    torch.manual_seed(0)
    curve.on_train_begin(None, state, None, model=model)
    for step in range(1, 11):
        state.global_step = step
        curve.on_step_end(None, state, None, model=model)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
    assert [p["step"] for p in curve.curve] == [0, 3, 6, 9, 10]  # every ceil(10 / 4) steps, and the last
    assert seen_modes == [False] * 5 and model.training


def test_report_only_on_the_first_comparisons_json_says_to_run_again(tmp_path):
    (tmp_path / "reproduction.json").write_text(json.dumps({"main": {}, "efficiency_curve": []}))
    with pytest.raises(ValueError, match="older `saisa reproduce`"):
        reproduce(ReproduceSettings(docs=str(tmp_path), report_only=True))
