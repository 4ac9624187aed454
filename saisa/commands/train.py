"""`saisa train RECIPE.yaml [--set key.sub=value ...] [--resume]`: one training stage (align or instruct).

Multi-GPU: `accelerate launch -m saisa.cli train ...` or `torchrun --nproc_per_node N -m saisa.cli train ...`, with
`--set training.deepspeed=zero3` (a shipped config: zero2, zero3, zero3_offload; or a path) or
`--set training.fsdp="full_shard auto_wrap"`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe entry, e.g. --set stage=instruct --set training.max_steps=100",
    )
    parser.add_argument("--stage", choices=["align", "instruct"])
    parser.add_argument("--architecture", choices=["saisa", "llava", "naavit"])
    parser.add_argument("--output-dir")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")


def run(args: argparse.Namespace) -> int:
    from saisa.training import load_recipe, run_training

    overrides = list(args.overrides)
    for key in ("stage", "architecture", "output_dir"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    run_training(load_recipe(args.recipe, overrides), resume=args.resume)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down before the interpreter exits.

    A rank that exits with gloo's threads still live (its peer still saving) can abort in C++ ("terminate called
    without an active exception", seen in CI), failing a run whose training had finished on every rank.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
