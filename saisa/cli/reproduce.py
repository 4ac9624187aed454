"""`saisa reproduce`: a small-scale replication of the paper's comparisons on real models and real tasks, fair by
construction (`saisa.experiments.reproduce`). Writes `reproduction.json`, then `reproduction.md` and the plots from it,
under `--docs`."""

from __future__ import annotations

import argparse

from saisa.checkpoints.loading import add_device_arguments
from saisa.cli import settings_from
from saisa.experiments.reproduce import QUICK, TASKS, ReproduceSettings


def quick_text() -> str:
    return (
        "; ".join(
            f"--{key.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
            for key, v in QUICK.items()
        )
        + " (in place of those flags)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ReproduceSettings()
    parser.add_argument("--workdir", default="runs/reproduce")
    parser.add_argument("--docs", default="docs", help="where reproduction.md/.json/.png go")
    parser.add_argument("--tasks", nargs="+", default=list(d.tasks), choices=list(TASKS), help="the tasks compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    parser.add_argument("--image-size", type=int, default=d.image_size, help="224 px: 7x7 = 49 visual tokens")
    sizes = parser.add_argument_group("Fashion-MNIST sizes (per class, 10 classes)")
    sizes.add_argument("--align-per-class", type=int, default=d.align_per_class, help="align captions")
    sizes.add_argument("--instruct-per-class", type=int, default=d.instruct_per_class, help="instruct questions")
    sizes.add_argument("--val-per-class", type=int, default=d.val_per_class, help="validation questions (LR choice)")
    sizes.add_argument("--test-per-class", type=int, default=d.test_per_class, help="held-out test questions")
    sizes = parser.add_argument_group("easy-VQA sizes (per caption: 24 shape-colour pairs; per answer: 13)")
    sizes.add_argument("--vqa-align-per-caption", type=int, default=d.vqa_align_per_caption, help="align captions")
    sizes.add_argument("--vqa-instruct-per-answer", type=int, default=d.vqa_instruct_per_answer)
    sizes.add_argument("--vqa-val-per-answer", type=int, default=d.vqa_val_per_answer)
    sizes.add_argument("--vqa-test-per-answer", type=int, default=d.vqa_test_per_answer)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--align-lr", type=float, default=d.align_lr, help="LLaVA-1.5's align learning rate")
    parser.add_argument(
        "--instruct-lrs", type=float, nargs="+", default=list(d.instruct_lrs), help="the grid searched for every arch."
    )
    parser.add_argument("--curve-points", type=int, default=d.curve_points, help="validation points per LR run")
    parser.add_argument("--curve-image-sizes", type=int, nargs="+", default=list(d.curve_image_sizes))
    parser.add_argument("--repeats", type=int, default=d.repeats, help="interleaved timing repeats per curve point")
    parser.add_argument("--quick", action="store_true", help="the small comparison: " + quick_text())
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite reproduction.md and the plots from --docs/reproduction.json"
    )
    parser.add_argument(
        "--curve-only", action="store_true", help="only the efficiency curve (minutes): no training, no accuracy table"
    )
    parser.add_argument("--note", help="the operator's note, kept in the JSON and printed in the markdown")
    parser.add_argument("--keep-models", action="store_true", help="keep every trained model folder (~0.6 GB each)")
    add_device_arguments(parser)  # for evaluation and timing; training runs where the Trainer finds an accelerator


def run(args: argparse.Namespace) -> int:
    from saisa.experiments.reproduce import reproduce

    print(reproduce(settings_from(ReproduceSettings, args)))
    return 0
