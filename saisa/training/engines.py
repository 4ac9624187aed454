"""Which engine trains a run (single process, DDP, DeepSpeed ZeRO, FSDP2), set up through transformers' Trainer and
accelerate, and a final save that gathers sharded weights into one `from_pretrained` folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

DEEPSPEED_DIR = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"
INSTALL_DEEPSPEED = "pip install 'saisa[deepspeed]'"


def deepspeed_config(name_or_path: str, *, on_gpu: bool) -> dict:
    """A shipped config name (zero2, zero3, zero3_offload) or a JSON path, read into the dict the Trainer takes."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ImportError(f"training.deepspeed={name_or_path} needs DeepSpeed: {INSTALL_DEEPSPEED}") from error
    if "LOCAL_RANK" not in os.environ:  # else DeepSpeed looks for MPI and fails on a missing mpi4py
        raise ValueError(
            f"training.deepspeed={name_or_path} runs under a launcher: torchrun --nproc_per_node N "
            "-m saisa.cli train ... (N=1 for one GPU) or accelerate launch; or set training.deepspeed=null"
        )
    path = Path(name_or_path)
    if not path.exists():
        path = DEEPSPEED_DIR / f"{name_or_path}.json"
        if not path.exists():
            shipped = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
            raise FileNotFoundError(
                f"DeepSpeed config {name_or_path!r} is neither a file nor a shipped one ({shipped})"
            )
    config = json.loads(path.read_text())
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # Without it the final save would hold no weights, only a ZeRO checkpoint for zero_to_fp32.py.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if not on_gpu and zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # accelerate would swap in DeepSpeedCPUAdam, a C++ op compiled at first use; the Trainer's AdamW is exact here.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def decoder_layer_class(model: nn.Module) -> str:
    """The LLM's decoder layer class name: FSDP shards each such layer, then the root."""
    return type(model.family.layers(model.language_model)[0]).__name__


def fsdp_config_for(model: nn.Module, fsdp_config: dict | str | None) -> dict | str:
    """FSDP2 wrapping each decoder layer of the LLM unless the recipe says otherwise (a JSON path is kept as is)."""
    if isinstance(fsdp_config, str):
        return fsdp_config
    return {"version": 2, "transformer_layer_cls_to_wrap": [decoder_layer_class(model)], **(fsdp_config or {})}


def enable_fsdp_on_cpu(trainer) -> None:
    """accelerate turns its FSDP plugin on for GPU-like devices only: on CPU processes (gloo) it silently keeps DDP.
    FSDP2 itself shards on CPU, so hand the run to accelerate's own FSDP2 path (`fsdp2_prepare_model`)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU processes needs FSDP2: set training.fsdp_config.version=2")
    # Private accelerate state, no public setter: both shared states, as AcceleratorState itself does (every
    # AcceleratorState() re-reads PartialState's type).
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True  # the Trainer's own switch for its FSDP paths (save, load, optimizer creation)


def describe_engine(trainer) -> str:
    """One line naming the engine and its sharding, e.g. "DeepSpeed ZeRO-3 over 2 ranks"."""
    ranks = f"over {trainer.args.world_size} rank{'s' if trainer.args.world_size > 1 else ''}"
    if trainer.is_deepspeed_enabled:
        ds_config = trainer.args.hf_deepspeed_config
        offloaded = [
            name
            for key, name in (("optimizer", "optimizer state"), ("param", "parameters"))
            if ds_config.get_value(f"zero_optimization.offload_{key}.device", "none") != "none"
        ]
        offload = f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else ""
        return f"DeepSpeed ZeRO-{ds_config.get_value('zero_optimization.stage')} {ranks}{offload}"
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2:
            sharding = "full_shard" if plugin.reshard_after_forward else "shard_grad_op"
        else:
            sharding = str(plugin.sharding_strategy).rsplit(".", 1)[-1].lower()
        wrapped = plugin.transformer_cls_names_to_wrap
        units = f" (each {', '.join(wrapped)} sharded, then the root)" if wrapped else ""
        return f"FSDP{plugin.fsdp_version} {sharding} {ranks}{units}"
    if trainer.args.world_size > 1:
        return f"DDP {ranks}"
    return f"single process on {trainer.args.device}"


def check_lora_supported(trainer) -> None:
    """Merging LoRA needs the full base weights: ZeRO-3 gathers them (`save_final`), FSDP2 holds them as DTensors."""
    if trainer.is_fsdp_enabled:
        raise ValueError(
            "LoRA with FSDP is not supported (the merge needs the unsharded base weights): "
            "train LoRA with DDP or DeepSpeed (training.fsdp=null, training.deepspeed=zero2 or zero3)"
        )


def save_final(trainer, output_dir: Path, *, lora: bool) -> None:
    """The final `from_pretrained` folder, on every rank (gathering is collective): the Trainer's own save gathers
    ZeRO-3 partitions and FSDP shards. With LoRA: the adapter in `adapter/`, and the merged model in `output_dir`."""
    if not lora:
        trainer.save_model(str(output_dir))
        return
    trainer.save_model(str(output_dir / "adapter"))
    if not (trainer.is_deepspeed_enabled and trainer.args.hf_deepspeed_config.is_zero3()):
        merged = trainer.model.merge_and_unload()
        if trainer.args.should_save:
            merged.save_pretrained(str(output_dir))
        return
    import deepspeed

    # ZeRO-3 partitions every weight: gather them all for the merge, and copy the merged ones out before they are
    # partitioned again.
    with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
        merged = trainer.model.merge_and_unload()
        if trainer.args.should_save:
            state_dict = {name: value.detach().to("cpu", copy=True) for name, value in merged.state_dict().items()}
    if trainer.args.should_save:
        merged.save_pretrained(str(output_dir), state_dict=state_dict)
