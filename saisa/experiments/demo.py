"""The embedded default end to end on CPU (`saisa demo`).

Real SmolLM2-135M-Instruct + real EfficientNet-Lite0, real Fashion-MNIST images with text made from their real
labels: prepare the data, train `align` then `instruct`, evaluate on a held-out split, and report the accuracy next
to a blind baseline (the same model asked without the image).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def demo(
    architecture: str,
    workdir: str | Path,
    *,
    seeds: list[int],
    json_path: str | Path | None = None,
    **pipeline,
) -> dict:
    """`run_pipeline` once per seed (in `workdir`, or `workdir/seedN` for several seeds), each seed's report logged as
    it finishes; returns the summary across seeds, also written to `json_path` if given."""
    reports = []
    for seed in seeds:
        work = Path(workdir) if len(seeds) == 1 else Path(workdir) / f"seed{seed}"
        report = run_pipeline(architecture, work, seed=seed, **pipeline)
        logger.info(_seed_report(report, seed))
        reports.append(report)
    summary = {
        "architecture": architecture,
        "seeds": list(seeds),
        "accuracy_per_seed": [r["accuracy"] for r in reports],
        "blind_accuracy_per_seed": [r["blind_accuracy"] for r in reports],
        "minutes_per_seed": [r["timings"]["total_s"] / 60 for r in reports],
        "held_out_questions": reports[0]["held_out_questions"],
    }
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def across_seeds(summary: dict) -> str:
    """The mean over seeds, from `demo`'s summary (empty for one seed)."""
    accuracies = summary["accuracy_per_seed"]
    if len(accuracies) < 2:
        return ""
    per_seed = ", ".join(f"{100 * a:.1f}%" for a in accuracies)
    mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
    return f"\nmean over seeds {summary['seeds']}: {100 * mean:.1f}% (± {100 * std:.1f}); per seed: {per_seed}"


def _seed_report(report: dict, seed: int) -> str:
    t = report["timings"]
    return "\n".join(
        [
            f"\n{report['architecture']} on SmolLM2-135M-Instruct + EfficientNet-Lite0, Fashion-MNIST, seed {seed}, "
            f"{report['held_out_questions']} held-out questions 'What is this item?'",
            f"  exact match with the image : {100 * report['accuracy']:5.1f}%",
            f"  blind (same model, no image): {100 * report['blind_accuracy']:5.1f}%   "
            f"(chance {100 * report['chance']:.0f}%)",
            f"  time: data {t['data_s']:.0f} s, align {t['align_s']:.0f} s, instruct {t['instruct_s']:.0f} s, "
            f"eval {t['eval_s']:.0f} s, total {t['total_s'] / 60:.1f} min",
            f"  model: {report['model']}   try: saisa ask {report['model']} --image IMG 'What is this item?'",
        ]
    )


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
    from saisa.checkpoints.loading import load_pretrained
    from saisa.evaluation import evaluate
    from saisa.experiments.fashion_mnist import keep_first_records, prepare
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
