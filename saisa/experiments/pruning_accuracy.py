"""Accuracy against cost with visual K/V pruning, on the real embedded models trained on easy-VQA (the reproduction's
data and training policy; one seed, one learning rate): each of SAISA, LLaVA and NAAViT is trained once, then answers
the test questions with FastV-style pruning (`saisa.model.pruning`; SAISA also per layer) at r = 1 / 0.5 / 0.25 / 0.1,
at the trained resolution (224 px: v = 49) and with AnyRes tiles (base + 2x2 tiles, 5 x 49 = 245 positions; not
trained with tiles). Per point: accuracy, analytic prefill FLOPs (`saisa.bench.flops`) and the visual KV-cache MB
(float32) of one question. Writes pruning_accuracy.json / .md and the Pareto plot pruning_pareto.png.

    python -m saisa.experiments.pruning_accuracy --out docs --instruct-per-answer 12

With `--score-layers K ...`: SAISA's and LLaVA's accuracy with FastV at r = 0.25 scored at each layer K, from the same
trained models (pruning_score_layer.json / .md / .png).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from saisa.experiments.records import publish, run_line

ARCHS = ("saisa", "llava", "naavit")
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
RESOLUTIONS = {"224 px (v=49)": False, "224 px + 2x2 tiles (5 x 49)": True}  # name -> tiled
SWEPT = ("saisa", "llava")  # the score-layer sweep's architectures
LEARNING_RATE = 1e-4  # the higher of the reproduction's instruct grid: one run per architecture, no sweep

logger = logging.getLogger(__name__)


SMOKE = {"vqa_align_per_caption": 1, "vqa_instruct_per_answer": 1, "vqa_val_per_answer": 1, "vqa_test_per_answer": 1}


def measure(workdir: Path, seed: int = 0, **sizes) -> dict:
    """sizes: ReproduceSettings' easy-VQA sizes to change (`SMOKE`: a minutes-long check that the path works)."""
    from saisa.model.pruning import VisualPruning

    task, data, models = _trained(workdir, seed, sizes)
    points = []
    for arch in ARCHS:
        model, processor, text_tokens = models(arch)
        side = processor.preprocessing.image_size
        for resolution, tiled in RESOLUTIONS.items():
            processor.image_grid_pinpoints = [[2 * side, 2 * side]] if tiled else None  # base view + 2 x 2 tiles
            # SAISA also per layer: its visual K/V are made afresh in each layer (LLaVA's flow between layers)
            methods = ("fastv", "per_layer") if model.config.arch.visual_keys_values_only else ("fastv",)
            for ratio, method in [(1.0, None)] + [(r, m) for m in methods for r in KEEP_RATIOS if r < 1]:
                pruning = VisualPruning(ratio, method) if method else None
                point = _point(model, processor, data, workdir, pruning, text_tokens)
                points.append({"architecture": arch, "resolution": resolution, **point})
                logger.info("%s %s %s r=%g: accuracy %.3f", arch, resolution, method, ratio, point["accuracy"])
        model.config.set_visual_pruning(None)
    return {"task": task.description, "seed": seed, "learning_rate": LEARNING_RATE, "points": points}


def sweep_score_layer(workdir: Path, layers: list[int], seed: int = 0, ratio: float = 0.25, **sizes) -> dict:
    """FastV at keep ratio `ratio` scored at each of `layers`, for SAISA and LLaVA at 224 px, against r = 1: a later
    score layer sees more of what the text took from the image, and prunes fewer layers."""
    from saisa.model.pruning import VisualPruning

    task, data, models = _trained(workdir, seed, sizes)
    points = []
    for arch in SWEPT:
        model, processor, text_tokens = models(arch)
        for layer in [None, *layers]:
            pruning = VisualPruning(ratio, "fastv", layer) if layer is not None else None
            point = _point(model, processor, data, workdir, pruning, text_tokens)
            points.append({"architecture": arch, "score_layer": layer, **point})
            logger.info("%s fastv r=%g at layer %s: accuracy %.3f", arch, ratio, layer, point["accuracy"])
        model.config.set_visual_pruning(None)
    return {
        "task": task.description,
        "seed": seed,
        "learning_rate": LEARNING_RATE,
        "keep_ratio": ratio,
        "layers": model.config.text_config.num_hidden_layers,  # the same LLM for every architecture
        "points": points,
    }


def _trained(workdir: Path, seed: int, sizes: dict):
    """easy-VQA prepared under `workdir` and a function arch -> (model, processor, mean prompt tokens) of the model
    trained on it (trained on first use, reused afterwards)."""
    from saisa.checkpoints.loading import load_pretrained
    from saisa.experiments.reproduce import TASKS, ReproduceSettings, Runs
    from saisa.model.feature_cache import VisionFeatureCache

    settings = replace(ReproduceSettings(), workdir=str(workdir), seeds=(seed,), instruct_lrs=(LEARNING_RATE,), **sizes)
    task = TASKS["easy-vqa"]
    work = workdir / task.name
    data = task.prepare(work / "data", settings)
    runs = Runs(work, data, settings, task)

    def models(arch: str):
        model, processor = load_pretrained(runs.trained(arch, seed, LEARNING_RATE))
        model.vision_feature_cache = VisionFeatureCache(runs.features)
        return model, processor, _mean_prompt_tokens(processor, data["test"])

    return task, data, models


def _point(model, processor, data: dict, workdir: Path, pruning, text_tokens: int) -> dict:
    """Test accuracy with `pruning` (None: off) and one question's analytic prefill FLOPs and visual KV MB."""
    from saisa.bench.flops import dims_from_config, kv_cache_bytes, prefill_flops, with_visual_tokens
    from saisa.evaluation import evaluate

    arch = model.config.architecture
    model.config.set_visual_pruning(pruning)
    views = processor.num_views((64, 64))  # easy-VQA's images are 64 x 64
    method, ratio = (pruning.method, pruning.keep_ratio) if pruning else ("none", 1.0)
    layer = f"-k{pruning.score_layer}" if pruning else ""
    out = workdir / "pruning" / f"{arch}-{views}views-{method}-r{ratio:g}{layer}"
    folder = data["test"].parent
    scores = evaluate(model, processor, data["test"], folder, out_dir=out, batch_size=32, max_new_tokens=8)
    dims = dims_from_config(model.config)
    flops = prefill_flops(dims, arch, text_tokens, images=views, lm_head=True, pruning=pruning)
    kept = pruning.kept(model.tokens_per_image) if pruning else model.tokens_per_image
    visual_kv = kv_cache_bytes(with_visual_tokens(dims, kept * views), arch, 0, bytes_per_value=4)
    return {
        "method": method,
        "keep_ratio": ratio,
        "visual_positions": views * model.tokens_per_image,
        "kept_visual_entries": views * kept,
        "accuracy": scores["accuracy"],
        "prefill_tflops": flops["total"] / 1e12,
        "visual_kv_mb": visual_kv / 2**20,
    }


def _mean_prompt_tokens(processor, questions: Path) -> int:
    """Mean prompt length in input_ids columns (the image's placeholder included, as the model runs it)."""
    from saisa.evaluation.runner import load_questions
    from saisa.inference.generation import user_prompt

    rows = load_questions(questions)
    lengths = [len(processor.tokenizer(user_prompt(processor, row["text"], 1)).input_ids) for row in rows]
    return round(sum(lengths) / len(lengths))


def markdown(result: dict) -> str:
    lines = [
        "# Visual K/V pruning: accuracy against cost (easy-VQA, real embedded models)",
        "",
        f"{run_line(result)} {result['task']}; "
        f"one seed ({result['seed']}), instruct learning rate {result['learning_rate']:g}. FastV-style pruning, "
        "scored at layer 2; prefill FLOPs analytic (LLM + projectors); visual KV MB analytic in float32. `per_layer`: "
        "every layer's text attends to that layer's own top visual K/V, in the prefill and in decoding (every layer "
        "still makes all of them to score them: no prefill FLOPs saved).",
        "",
        "| resolution | architecture | pruning | r | kept visual entries | accuracy | prefill TFLOPs | visual KV MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['resolution']} | {p['architecture']} | {p['method']} | {p['keep_ratio']:g} | "
            f"{p['kept_visual_entries']} | "
            f"{100 * p['accuracy']:.1f}% | {p['prefill_tflops']:.4f} | {p['visual_kv_mb']:.2f} |"
        )
    lines += ["", *_goal(result)]
    return "\n".join(lines) + "\n"


def _goal(result: dict) -> list[str]:
    """The issue's goal, read from the points: SAISA at r = 0.25 within 1 point of r = 1 (per pruning method)."""
    out = []
    for resolution in dict.fromkeys(p["resolution"] for p in result["points"]):
        saisa = {
            (p["method"], p["keep_ratio"]): p["accuracy"]
            for p in result["points"]
            if p["architecture"] == "saisa" and p["resolution"] == resolution
        }
        full = saisa[("none", 1.0)]
        for method in dict.fromkeys(m for m, r in saisa if r == 0.25):
            change = 100 * (saisa[(method, 0.25)] - full)
            verdict = ("within" if change >= -1 else "not within") + " the 1-point goal"
            out.append(
                f"- {resolution}, {method}: SAISA {100 * saisa[(method, 0.25)]:.1f}% at r=0.25 against "
                f"{100 * full:.1f}% at r=1 ({change:+.1f} points): {verdict}."
            )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resolutions = list(dict.fromkeys(p["resolution"] for p in result["points"]))
    figure, axes = plt.subplots(len(resolutions), 2, figsize=(11, 4 * len(resolutions)), squeeze=False)
    for row, resolution in zip(axes, resolutions, strict=True):
        costs = (("prefill_tflops", "prefill TFLOPs"), ("visual_kv_mb", "visual KV MB"))
        for axis, (cost, label) in zip(row, costs, strict=True):
            here = [p for p in result["points"] if p["resolution"] == resolution]
            for arch, marker in zip(ARCHS, "osD", strict=True):
                full = [p for p in here if p["architecture"] == arch and p["method"] == "none"]
                for method in dict.fromkeys(p["method"] for p in here if p["architecture"] == arch):
                    if method == "none":
                        continue
                    points = full + [p for p in here if p["architecture"] == arch and p["method"] == method]
                    xs, ys = [p[cost] for p in points], [100 * p["accuracy"] for p in points]
                    axis.plot(xs, ys, marker, ls="-" if method == "fastv" else ":", label=f"{arch} {method}")
                for p in (p for p in here if p["architecture"] == arch):
                    axis.annotate(f"r={p['keep_ratio']:g}", (p[cost], 100 * p["accuracy"]), fontsize=7)
            axis.set(title=resolution, xlabel=label, ylabel="accuracy %")
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sweep_markdown(result: dict) -> str:
    lines = [
        "# FastV's score layer: accuracy against cost (easy-VQA, real embedded models)",
        "",
        f"{run_line(result)} {result['task']}; one seed ({result['seed']}), instruct learning rate "
        f"{result['learning_rate']:g}, 224 px (v = 49). FastV-style pruning at r = {result['keep_ratio']:g}, scored at "
        f"layer K of {result['layers']}: layers after K use the kept entries only, so a later K saves less.",
        "",
        "| architecture | score layer K | accuracy | change against r = 1 | prefill TFLOPs |",
        "|---|---|---|---|---|",
    ]
    for arch in dict.fromkeys(p["architecture"] for p in result["points"]):
        here = [p for p in result["points"] if p["architecture"] == arch]
        full = next(p for p in here if p["score_layer"] is None)
        for p in here:
            layer = "- (r = 1)" if p["score_layer"] is None else p["score_layer"]
            change = 100 * (p["accuracy"] - full["accuracy"])
            lines.append(
                f"| {arch} | {layer} | {100 * p['accuracy']:.1f}% | {change:+.1f} | {p['prefill_tflops']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def sweep_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arch, marker in zip(SWEPT, "os", strict=True):
        here = [p for p in result["points"] if p["architecture"] == arch]
        full = next(p for p in here if p["score_layer"] is None)
        swept = [p for p in here if p["score_layer"] is not None]
        line = axes[0].plot([p["score_layer"] for p in swept], [100 * p["accuracy"] for p in swept], marker + "-")
        axes[0].axhline(100 * full["accuracy"], color=line[0].get_color(), ls=":", label=f"{arch} r = 1")
        axes[0].plot([], [], marker + "-", color=line[0].get_color(), label=f"{arch} r = {result['keep_ratio']:g}")
        axes[1].plot([p["prefill_tflops"] for p in here], [100 * p["accuracy"] for p in here], marker, label=arch)
        for p in here:
            name = "r=1" if p["score_layer"] is None else f"K={p['score_layer']}"
            axes[1].annotate(name, (p["prefill_tflops"], 100 * p["accuracy"]), fontsize=7)
    axes[0].set(xlabel="score layer K", ylabel="accuracy %", title="accuracy by score layer")
    axes[1].set(xlabel="prefill TFLOPs", ylabel="accuracy %", title="accuracy against prefill FLOPs")
    for axis in axes:
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--workdir", default="runs/pruning")
    parser.add_argument("--smoke", action="store_true", help="one record per caption/answer: checks the path only")
    parser.add_argument("--instruct-per-answer", type=int, help="instruct records per answer (default reproduce's)")
    parser.add_argument(
        "--score-layers", type=int, nargs="+", help="instead: FastV at r = 0.25 scored at each of these layers"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    sizes = SMOKE if args.smoke else {}
    if args.instruct_per_answer:
        sizes = {**sizes, "vqa_instruct_per_answer": args.instruct_per_answer}
    command = "python -m saisa.experiments.pruning_accuracy " + " ".join(argv or [])
    if args.score_layers:
        result = sweep_score_layer(Path(args.workdir), args.score_layers, **sizes)
        report = {"stem": "pruning_score_layer", "plot_name": "pruning_score_layer.png"}
        report.update(markdown=sweep_markdown, plot=sweep_plot)
    else:
        result = measure(Path(args.workdir), **sizes)
        report = {"stem": "pruning_accuracy", "plot_name": "pruning_pareto.png", "markdown": markdown, "plot": plot}
    text = publish(result, Path(args.out), command=command, started=start, **report)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
