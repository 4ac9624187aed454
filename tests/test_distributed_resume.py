"""Checkpoints of sharded engines prove themselves too (torchrun, 2 CPU ranks over gloo): FSDP2's model and optimizer
files and DeepSpeed's global_stepN/ shards are in the manifest, a resume continues to the uninterrupted weights, and
a damaged shard is refused the same way on every rank (rank 0 verifies and tells the others), none left waiting.

This file is also the worker: one torchrun launch runs every engine's three runs in turn.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file


def _engines() -> dict[str, dict]:
    engines = {"fsdp": {"deepspeed": None, "fsdp": "full_shard auto_wrap"}}
    try:
        import deepspeed  # noqa: F401

        engines["zero2"] = {"deepspeed": "zero2"}
    except ImportError:
        pass
    return engines


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    from test_training import _write_run

    tmp_path = tmp_path_factory.mktemp("resume")
    base = _write_run(tmp_path, "saisa", samples=8)
    plan = {}
    for name, training in _engines().items():
        recipe = {**base, "output_dir": str(tmp_path / name)}
        recipe["training"] = {**base["training"], "max_steps": 3, "save_steps": 2, "learning_rate": 1e-3, **training}
        plan[name] = recipe
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    launch = torchrun(__file__, str(tmp_path / "plan.json"), timeout=600, DS_ACCELERATOR="cpu")
    assert launch.returncode == 0, launch.stdout[-4000:] + launch.stderr[-4000:]
    return {
        name: json.loads((Path(recipe["output_dir"]) / "outcome.json").read_text()) for name, recipe in plan.items()
    }


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_sharded_checkpoint_resumes_and_a_damaged_shard_is_refused_on_every_rank(outcomes, engine):
    if engine not in outcomes:
        pytest.fail("DeepSpeed is not importable: install the `deepspeed` extra (pip install 'saisa[deepspeed]')")
    outcome = outcomes[engine]
    manifest = outcome["manifest"]
    if engine == "fsdp":  # accelerate's FSDP2 full state dicts
        assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= set(manifest), manifest
    else:
        assert any(name.startswith("global_step2/") and "optim_states" in name for name in manifest), manifest
    uninterrupted, resumed = load_file(outcome["uninterrupted"]), load_file(outcome["resumed"])
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-6, msg=f"{engine}: {key}")
    assert outcome["refused"] == [True, True]  # both ranks raised CheckpointError
    assert f"{outcome['damaged']}: its SHA-256 differs" in outcome["message"]


# -- the worker, under torchrun ------------------------------------------------------------------------------------
def _run_plan(plan_path: str) -> None:
    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from saisa.training import run_training
    from saisa.training.trainer import MANIFEST, CheckpointError

    clean_env = dict(os.environ)

    def reset():
        # Engines leave process-wide switches behind (ACCELERATE_USE_DEEPSPEED, ZeRO-3's config for from_pretrained)
        os.environ.clear()
        os.environ.update(clean_env)
        unset_hf_deepspeed_config()
        dist.barrier()

    for recipe in json.loads(Path(plan_path).read_text()).values():
        gc.freeze()
        out = Path(recipe["output_dir"])
        run_training(recipe)
        reset()
        interrupted = out.with_name(out.name + "_resumed")
        if dist.get_rank() == 0:  # killed after step 2: checkpoint-2, no final model
            shutil.copytree(out, interrupted, ignore=shutil.ignore_patterns("checkpoint-3"))  # saved at the end
            (interrupted / "model.safetensors").unlink()
        dist.barrier()
        resumed = {**recipe, "output_dir": str(interrupted)}
        run_training(resumed, resume=True)
        reset()
        manifest = json.loads((interrupted / "checkpoint-2" / MANIFEST).read_text())["files"]
        damaged = interrupted / "checkpoint-2" / max(manifest, key=lambda name: manifest[name]["size"])
        if dist.get_rank() == 0:
            (interrupted / "model.safetensors").rename(interrupted / "final.safetensors")
            shutil.rmtree(interrupted / "checkpoint-3")
            content = bytearray(damaged.read_bytes())
            content[100:164] = bytes(b ^ 0xFF for b in content[100:164])
            damaged.write_bytes(bytes(content))
        dist.barrier()
        refused, message = False, ""
        try:
            run_training(resumed, resume=True)
        except CheckpointError as error:
            refused, message = True, str(error)
        reset()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, refused)
        if dist.get_rank() == 0:
            outcome = {
                "manifest": manifest,
                "uninterrupted": str(out / "model.safetensors"),
                "resumed": str(interrupted / "final.safetensors"),
                "refused": everyone,
                "damaged": str(damaged),
                "message": message,
            }
            (out / "outcome.json").write_text(json.dumps(outcome))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _run_plan(sys.argv[1])
