"""`saisa train RECIPE.yaml [--set key.sub=value ...] [--resume [weights-only]]`: one training stage. Multi-GPU:
`accelerate launch -m saisa.cli train ...` or `torchrun --nproc_per_node N -m saisa.cli train ...`, with
`--set training.deepspeed=zero3` (shipped: zero2, zero3, zero3_offload; or a path) or `--set training.fsdp=full_shard`.
"""

from __future__ import annotations

import argparse
import errno
import sys


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
    from saisa.training.trainer import CheckpointError

    recipe, resume = recipe_and_resume_mode(args.recipe, args.resume)
    flags = {key: getattr(args, key) for key in ("stage", "architecture", "output_dir")}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value)]
    try:
        run_training(load_recipe(recipe, overrides), resume=resume or False)
    except (CheckpointError, FloatingPointError, OSError) as error:
        if isinstance(error, OSError) and error.errno != errno.ENOSPC:
            raise
        print(f"saisa train: error: {error}", file=sys.stderr)  # what to do next, not a traceback
        return 2
    _close_process_group()
    return 0


def recipe_and_resume_mode(recipe: str | None, resume: str | None) -> tuple[str | None, str | None]:
    """`--resume` takes an optional mode, so `train --resume RECIPE` hands it the recipe: give that back."""
    from saisa.training.trainer import RESUME_MODES

    if resume is None or resume in RESUME_MODES:
        return recipe, resume
    if recipe is not None:
        raise ValueError(f"--resume takes no value or {' or '.join(RESUME_MODES[1:])}, got {resume!r}")
    return resume, "full"


def _close_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down before the interpreter exits: a rank that
    exits with gloo's threads still live (its peer still saving) can abort in C++ and fail a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
