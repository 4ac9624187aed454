"""DeepSpeed ZeRO-2/ZeRO-3 and FSDP2 train what DDP trains, in the same layout (torchrun, 2 CPU ranks over gloo,
batch 4 each, 3 steps), and their final folders are whole `from_pretrained` models: the save gathers ZeRO-3
partitions and FSDP shards.

This file is also the worker: one torchrun launch per architecture trains every engine in turn, since starting two
processes costs more than the few steps each engine trains.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file

STEPS = 3
# fp32 reduction order differs per engine, so weights agree with DDP's to rounding, not bit for bit.
WEIGHT_ATOL = 2e-6
NEEDS_DEEPSPEED = "DeepSpeed is not importable: install the `deepspeed` extra (pip install 'saisa[deepspeed]')"
LORA_FSDP_REFUSED = "LoRA with FSDP is not supported"


def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _engines(tmp_path: Path) -> dict[str, dict]:
    """`training` overrides per engine; FSDP as the README writes it, the decoder layer class left to run_training."""
    engines = {"ddp": {}, "fsdp": {"deepspeed": None, "fsdp": "full_shard auto_wrap"}}
    if _deepspeed_importable():
        from saisa.training.engines import DEEPSPEED_DIR

        offload = json.loads((DEEPSPEED_DIR / "zero3_offload.json").read_text())
        offload["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
        (tmp_path / "zero3_offload_all.json").write_text(json.dumps(offload))
        engines |= {
            "zero2": {"deepspeed": "zero2"},
            "zero3": {"deepspeed": "zero3"},
            "zero3_offload": {"deepspeed": str(tmp_path / "zero3_offload_all.json")},
        }
    return engines


def _plan(tmp_path: Path, arch: str) -> list[dict]:
    from test_training import _write_run

    base = _write_run(tmp_path, arch, samples=8)
    base["training"] = {
        **base["training"],
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "max_grad_norm": 1.0,
        "save_strategy": "no",
    }
    runs = {name: {"training": overrides} for name, overrides in _engines(tmp_path).items()}
    if arch == "saisa":
        lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
        runs |= {"lora_ddp": lora, "lora_fsdp": {**lora, **runs["fsdp"], "refused": True}}
        if "zero3" in runs:
            runs["lora_zero3"] = {**lora, **runs["zero3"]}
    plan = []
    for name, extra in runs.items():
        recipe = {**base, **{k: v for k, v in extra.items() if k != "refused"}, "output_dir": str(tmp_path / name)}
        recipe["training"] = {**base["training"], **extra.get("training", {})}
        plan.append({"name": name, "recipe": recipe, "refused": extra.get("refused", False)})
    return plan


_LAUNCHES: dict[str, tuple[str | None, dict[str, Path]]] = {}


def _launch(arch: str, tmp_path_factory) -> dict[str, Path]:
    """Every engine's output folder for `arch`, trained by one torchrun launch (shared by this module's tests)."""
    if arch not in _LAUNCHES:
        tmp_path = tmp_path_factory.mktemp(arch)
        plan = _plan(tmp_path, arch)
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        # CPU ranks even on a GPU machine; DeepSpeed's CPU accelerator then uses torchrun's gloo process group.
        launch = torchrun(__file__, str(tmp_path / "plan.json"), timeout=600, DS_ACCELERATOR="cpu")
        failure = None if launch.returncode == 0 else launch.stdout[-4000:] + launch.stderr[-4000:]
        _LAUNCHES[arch] = failure, {run["name"]: Path(run["recipe"]["output_dir"]) for run in plan}
    failure, outputs = _LAUNCHES[arch]
    assert failure is None, failure
    return outputs


@pytest.fixture(params=["saisa", "llava"])
def runs(request, tmp_path_factory) -> dict[str, Path]:
    return _launch(request.param, tmp_path_factory)


@pytest.fixture
def saisa_runs(tmp_path_factory) -> dict[str, Path]:
    return _launch("saisa", tmp_path_factory)


def _logs(out: Path) -> list[dict]:
    return json.loads((out / "probe.json").read_text())["logs"]


def _shards(out: Path) -> list[dict]:
    return json.loads((out / "probe.json").read_text())["shards"]


def _assert_matches_ddp(out: Path, ddp: Path) -> None:
    from saisa import SaisaForConditionalGeneration

    reference = _logs(ddp)
    assert len(reference) == STEPS
    for got, want in zip(_logs(out), reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (out.name, got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (out.name, got, want)
    saved = load_file(out / "model.safetensors")
    assert not [key for key, value in saved.items() if value.numel() == 0], f"{out.name}: empty tensors saved"
    want_weights = SaisaForConditionalGeneration.from_pretrained(ddp).state_dict()
    got_weights = SaisaForConditionalGeneration.from_pretrained(out).state_dict()
    assert got_weights.keys() == want_weights.keys()
    largest = max((got_weights[key] - value).abs().max().item() for key, value in want_weights.items())
    architecture = json.loads((out / "training_report.json").read_text())["architecture"]
    print(
        f"\n{architecture} {out.name}: losses {[e['loss'] for e in _logs(out)]}, grad norms "
        f"{[round(e['grad_norm'], 6) for e in _logs(out)]}, max |dw| vs {ddp.name} {largest:.1e}; rank 0 holds "
        "{local} of {full} elements, {partitioned} of {params} parameters partitioned".format(**_shards(out)[0])
    )
    for key, value in want_weights.items():
        torch.testing.assert_close(got_weights[key], value, atol=WEIGHT_ATOL, rtol=1e-5, msg=f"{out.name}: {key}")
    for name in ("processor_config.json", "training_report.json", "loss.png"):
        assert (out / name).exists(), f"{out.name}: {name} missing"


def _require_deepspeed(runs: dict[str, Path]) -> None:
    if not _deepspeed_importable():
        pytest.fail(NEEDS_DEEPSPEED)
    assert "zero2" in runs


def test_ddp_keeps_every_parameter_whole(runs):
    for shard in _shards(runs["ddp"]):
        assert shard["local"] == shard["full"] and shard["partitioned"] == 0, shard


def test_fsdp_shards_each_rank_and_matches_ddp(runs):
    shards = _shards(runs["fsdp"])
    assert len(shards) == 2
    for shard in shards:  # FSDP2 turns every parameter into a DTensor holding its rank's half
        assert shard["partitioned"] == shard["params"] and shard["local"] <= shard["full"] // 2 + 64, shard
    _assert_matches_ddp(runs["fsdp"], runs["ddp"])


def test_zero2_matches_ddp(runs):
    _require_deepspeed(runs)
    _assert_matches_ddp(runs["zero2"], runs["ddp"])


def test_zero3_partitions_gathers_on_save_and_matches_ddp(runs):
    _require_deepspeed(runs)
    for shard in _shards(runs["zero3"]):  # small parameters stay whole below the persistence threshold
        assert 0 < shard["partitioned"] < shard["params"] and shard["local"] < shard["full"], shard
    _assert_matches_ddp(runs["zero3"], runs["ddp"])


def test_zero3_offload_partitions_every_parameter_and_matches_ddp(runs):
    _require_deepspeed(runs)
    for shard in _shards(runs["zero3_offload"]):
        assert shard["partitioned"] == shard["params"] and shard["local"] <= shard["full"] // 2 + 64, shard
    _assert_matches_ddp(runs["zero3_offload"], runs["ddp"])


def test_lora_under_zero3_merges_gathered_weights(saisa_runs):
    _require_deepspeed(saisa_runs)
    assert (saisa_runs["lora_zero3"] / "adapter" / "adapter_config.json").exists()
    assert not any("lora" in key for key in load_file(saisa_runs["lora_zero3"] / "model.safetensors"))
    _assert_matches_ddp(saisa_runs["lora_zero3"], saisa_runs["lora_ddp"])


def test_lora_under_fsdp_is_refused_before_training(saisa_runs):
    refused = json.loads((saisa_runs["lora_fsdp"] / "probe.json").read_text())
    assert LORA_FSDP_REFUSED in refused["error"] and refused["logs"] == []


# -- the worker, under torchrun ------------------------------------------------------------------------------------
def _shard_stats(model: torch.nn.Module) -> dict:
    """Elements this rank holds against the full model: FSDP2 keeps DTensor shards, ZeRO-3 empties partitioned
    parameters outside their forward and keeps the rank's part in `ds_tensor`."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    stats = {"params": len(params), "partitioned": 0, "local": 0, "full": 0}
    for param in params:
        if isinstance(param, DTensor):
            stats["partitioned"] += 1
            stats["local"] += param.to_local().numel()
            stats["full"] += param.numel()
        elif hasattr(param, "ds_tensor") and param.numel() == 0:
            stats["partitioned"] += 1
            stats["local"] += param.ds_tensor.numel()
            stats["full"] += param.ds_numel
        else:
            stats["local"] += param.numel()
            stats["full"] += param.numel()
    return stats


def _probe(output_dir: Path):
    """A callback writing `probe.json`: rank 0's logged losses, and every rank's shard sizes after the first step."""
    import torch.distributed as dist
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.logs: list[dict] = []
            self.local_shards: dict | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.local_shards is None:
                self.local_shards = _shard_stats(model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logs.append({"loss": logs["loss"], "grad_norm": float(logs["grad_norm"])})

        def on_train_end(self, args, state, control, **kwargs):
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, self.local_shards)
            if state.is_world_process_zero:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / "probe.json").write_text(json.dumps({"logs": self.logs, "shards": shards}))

    return Probe()


def _run_plan(plan_path: str) -> None:
    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from saisa.training import run_training

    clean_env = dict(os.environ)
    for run in json.loads(Path(plan_path).read_text()):
        output_dir = Path(run["recipe"]["output_dir"])
        # accelerate and DeepSpeed call gc.collect() in every run: spare them scanning every module imported so far.
        gc.freeze()
        try:
            run_training(run["recipe"], callbacks=[_probe(output_dir)])
        except ValueError as error:  # a refusal before training: the same on every rank
            if not run["refused"]:
                raise
            if dist.get_rank() == 0:
                output_dir.mkdir(parents=True, exist_ok=True)
                (output_dir / "probe.json").write_text(json.dumps({"logs": [], "error": str(error)}))
        # Engines leave process-wide switches behind (ACCELERATE_USE_DEEPSPEED, ZeRO-3's config for from_pretrained)
        os.environ.clear()
        os.environ.update(clean_env)
        unset_hf_deepspeed_config()
        dist.barrier()
    dist.destroy_process_group()  # before exit, else a rank may abort in gloo's threads while its peer still runs


if __name__ == "__main__":
    _run_plan(sys.argv[1])
