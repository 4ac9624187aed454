"""`saisa demo`: the embedded default end to end on CPU.

Real SmolLM2-135M-Instruct + real EfficientNet-Lite0, real Fashion-MNIST images with text made from their real
labels: prepare the data, train `align` then `instruct`, evaluate on a held-out split, and print the accuracy next
to a blind baseline (the same model asked without the image).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saisa.loading import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=["saisa", "llava", "naavit"], default="saisa")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--align-per-class", type=int, default=200, help="align captions per class")
    parser.add_argument("--instruct-per-class", type=int, default=200, help="instruct questions per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="held-out questions per class")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank in instruct (0: projectors only)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)  # for the evaluation; training runs where the Trainer finds an accelerator


def run(args: argparse.Namespace) -> int:
    report = run_pipeline(
        args.architecture,
        Path(args.workdir),
        align_per_class=args.align_per_class,
        instruct_per_class=args.instruct_per_class,
        test_per_class=args.test_per_class,
        lora_r=args.lora_r,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    t = report["timings"]
    print(
        f"\n{report['architecture']} on SmolLM2-135M-Instruct + EfficientNet-Lite0, Fashion-MNIST, "
        f"{report['held_out_questions']} held-out questions 'What is this item?'"
    )
    print(f"  exact match with the image : {100 * report['accuracy']:5.1f}%")
    print(f"  blind (same model, no image): {100 * report['blind_accuracy']:5.1f}%   (chance 10%)")
    print(
        f"  time: data {t['data_s']:.0f} s, align {t['align_s']:.0f} s, instruct {t['instruct_s']:.0f} s, "
        f"eval {t['eval_s']:.0f} s, total {t['total_s'] / 60:.1f} min"
    )
    print(f"  model: {report['model']}   try: saisa ask {report['model']} --image IMG 'What is this item?'")
    return 0


def run_pipeline(
    arch: str,
    work: Path,
    *,
    align_per_class: int = 200,
    instruct_per_class: int = 200,
    test_per_class: int = 50,
    lora_r: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Prepare data, train align then instruct, evaluate with and without the image; returns the report."""
    from saisa.data.fashion_mnist import prepare
    from saisa.evaluation import evaluate
    from saisa.loading import load_pretrained
    from saisa.training import load_recipe, run_training

    timings, start = {}, time.perf_counter()
    data = prepare(
        work / "data",
        train_per_class=max(align_per_class, instruct_per_class),
        test_per_class=test_per_class,
        seed=seed,
    )
    _subsample(data["instruct"], instruct_per_class * 10)
    _subsample(data["align"], align_per_class * 10)
    timings["data_s"] = time.perf_counter() - start

    common = [f"architecture={arch}", f"data.image_folder={work / 'data'}", f"training.seed={seed}"]
    stage_start = time.perf_counter()
    align = run_training(
        load_recipe(
            "embedded-align",
            common
            + [
                f"data.train={data['align']}",
                f"output_dir={work / f'{arch}-align'}",
                f"model.shared_projector={arch == 'saisa'}",
            ],
        )
    )
    timings["align_s"] = time.perf_counter() - stage_start
    stage_start = time.perf_counter()
    instruct = run_training(
        load_recipe(
            "embedded-instruct",
            common
            + [
                f"data.train={data['instruct']}",
                f"model.init={align}",
                f"output_dir={work / f'{arch}-instruct'}",
                f"lora.r={lora_r}",
            ],
        )
    )
    timings["instruct_s"] = time.perf_counter() - stage_start

    model, processor = load_pretrained(instruct, device=device, dtype=dtype)
    stage_start = time.perf_counter()
    eval_dir = work / f"{arch}-eval"
    seen = evaluate(model, processor, data["test"], work / "data", out_dir=eval_dir, batch_size=32, max_new_tokens=8)
    blind = evaluate(
        model, processor, data["test"], work / "data", out_dir=eval_dir, batch_size=32, max_new_tokens=8, blind=True
    )
    timings["eval_s"] = time.perf_counter() - stage_start
    timings["total_s"] = time.perf_counter() - start
    report = {
        "architecture": arch,
        "accuracy": seen["accuracy"],
        "blind_accuracy": blind["accuracy"],
        "held_out_questions": seen["questions"],
        "chance": 0.1,
        "timings": timings,
        "model": str(instruct),
        "data": {k: str(v) for k, v in data.items()},
    }
    (work / f"{arch}-demo.json").write_text(json.dumps(report, indent=2))
    return report


def _subsample(path: Path, count: int) -> None:
    """Keep the first `count` records (the file is already class-balanced and shuffled)."""
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records[:count]))
