"""`saisa demo`: the embedded default end to end on CPU.

Real SmolLM2-135M-Instruct + real EfficientNet-Lite0, real Fashion-MNIST images with text made from their real
labels: prepare the data, train `align` then `instruct`, evaluate on a held-out split, and print the accuracy next
to a blind baseline (the same model asked without the image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from saisa.loading import add_device_arguments


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
    reports = []
    for seed in args.seeds:
        work = Path(args.workdir) if len(args.seeds) == 1 else Path(args.workdir) / f"seed{seed}"
        report = run_pipeline(
            args.architecture,
            work,
            align_per_class=args.align_per_class,
            instruct_per_class=args.instruct_per_class,
            test_per_class=args.test_per_class,
            lora_r=args.lora_r,
            seed=seed,
            device=args.device,
            dtype=args.dtype,
        )
        _print_report(report, seed)
        reports.append(report)
    accuracies = [r["accuracy"] for r in reports]
    if len(reports) > 1:
        per_seed = ", ".join(f"{100 * a:.1f}%" for a in accuracies)
        mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
        print(f"\nmean over seeds {args.seeds}: {100 * mean:.1f}% (± {100 * std:.1f}); per seed: {per_seed}")
    if args.json:
        summary = {
            "architecture": args.architecture,
            "seeds": list(args.seeds),
            "accuracy_per_seed": accuracies,
            "blind_accuracy_per_seed": [r["blind_accuracy"] for r in reports],
            "minutes_per_seed": [r["timings"]["total_s"] / 60 for r in reports],
            "held_out_questions": reports[0]["held_out_questions"],
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _print_report(report: dict, seed: int) -> None:
    t = report["timings"]
    print(
        f"\n{report['architecture']} on SmolLM2-135M-Instruct + EfficientNet-Lite0, Fashion-MNIST, seed {seed}, "
        f"{report['held_out_questions']} held-out questions 'What is this item?'"
    )
    print(f"  exact match with the image : {100 * report['accuracy']:5.1f}%")
    print(f"  blind (same model, no image): {100 * report['blind_accuracy']:5.1f}%   (chance 10%)")
    print(
        f"  time: data {t['data_s']:.0f} s, align {t['align_s']:.0f} s, instruct {t['instruct_s']:.0f} s, "
        f"eval {t['eval_s']:.0f} s, total {t['total_s'] / 60:.1f} min"
    )
    print(f"  model: {report['model']}   try: saisa ask {report['model']} --image IMG 'What is this item?'")


def run_pipeline(
    arch: str,
    work: Path,
    *,
    align_per_class: int = 400,
    instruct_per_class: int = 200,
    test_per_class: int = 50,
    lora_r: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Prepare data, train align then instruct, evaluate with and without the image; returns the report."""
    from saisa.data.fashion_mnist import keep_first_records, prepare
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
    keep_first_records(data["instruct"], instruct_per_class * 10)
    keep_first_records(data["align"], align_per_class * 10)
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
