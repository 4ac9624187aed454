"""`saisa demo`: the embedded default end to end on CPU (`saisa.experiments.demo`): real SmolLM2-135M-Instruct + real
EfficientNet-Lite0 trained on real Fashion-MNIST images, its held-out accuracy next to a blind baseline."""

from __future__ import annotations

import argparse

from saisa.checkpoints.loading import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=["saisa", "llava", "naavit"], default="saisa")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--align-per-class", type=int, default=400, help="align captions per class (cheap)")
    parser.add_argument("--instruct-per-class", type=int, default=200, help="instruct questions per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="held-out questions per class")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank in instruct (0: projectors only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (data, init, order)")
    parser.add_argument("--json", help="write every seed's accuracy and minutes here (e.g. docs/demo.json)")
    add_device_arguments(parser)  # for the evaluation; training runs where the Trainer finds an accelerator


def run(args: argparse.Namespace) -> int:
    from saisa.experiments.demo import across_seeds, demo

    summary = demo(
        args.architecture,
        args.workdir,
        seeds=args.seeds,
        json_path=args.json,
        align_per_class=args.align_per_class,
        instruct_per_class=args.instruct_per_class,
        test_per_class=args.test_per_class,
        lora_r=args.lora_r,
        device=args.device,
        dtype=args.dtype,
    )
    if mean := across_seeds(summary):  # several seeds
        print(mean)
    return 0
