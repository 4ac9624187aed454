"""`saisa train RECIPE.yaml [--set key.sub=value ...] [--resume [weights-only]]`: one training stage.

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
    parser.add_argument(
        "--resume",
        nargs="?",
        const="full",
        metavar="weights-only",
        help="continue from the newest checkpoint that verifies (its manifest's sizes and SHA-256), with its "
        "optimizer, scheduler and RNG states; `--resume weights-only` continues from its weights alone",
    )


def run(args: argparse.Namespace) -> int:
    from saisa.training import load_recipe, run_training
    from saisa.training.trainer import RESUME_MODES

    if args.resume is not None and args.resume not in RESUME_MODES:
        if args.recipe is not None:
            raise ValueError(f"--resume takes {' or '.join(RESUME_MODES)}, got {args.resume!r}")
        args.recipe, args.resume = args.resume, "full"  # `train --resume RECIPE`: the recipe, not a mode
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
