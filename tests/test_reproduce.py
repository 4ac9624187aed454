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
