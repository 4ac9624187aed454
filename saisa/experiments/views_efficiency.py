"""Where SAISA wins most, measured on the real embedded models (SmolLM2-135M + EfficientNet-Lite0, untrained
projectors: cost does not depend on their values): one image at v = 576, the same image AnyRes-tiled (base + 2x2 tiles:
5 x 576 = 2,880 visual positions) and an 8-frame video at 196 per frame; SAISA, LLaVA and NAAViT, without pruning and
with FastV-style visual K/V pruning at r = 0.5 / 0.25 / 0.1. Per point: prefill FLOPs (analytic, LLM only), KV-cache
MB of the visual entries (read from the real cache after a prefill) and time to first token (medians of interleaved
repeats). Writes views_efficiency.json, views_efficiency.md and views_efficiency.png.

    python -m saisa.experiments.views_efficiency --out docs --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saisa.experiments.records import publish, run_line

logger = logging.getLogger(__name__)

ARCHS = ("saisa", "llava", "naavit")
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
SETTINGS = {  # name -> (encoder image side, tiled (base + 2 x 2), video frames or None)
    "1 image, v=576": (768, None, None),
    "5 tiles, v=2880": (768, True, None),
    "8 frames x 196": (448, None, 8),
}
QUESTION = "What is in this picture? Answer in one word."


def _visual(seed: int) -> Image.Image:
    """A real photograph-like test input is not needed for cost: any square RGB image gives the same shapes."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (512, 512, 3), np.uint8))


def _inputs(processor, tiles: bool | None, frames: int | None):
    from saisa.inference.generation import user_prompt

    if tiles:  # one 2 x 2 grid whatever the image: the base view and 4 tiles
        side = processor.preprocessing.image_size
        processor.image_grid_pinpoints = [[2 * side, 2 * side]]
    prompt = user_prompt(processor, QUESTION, 1)
    if frames:
        prompt = prompt.replace(processor.image_token, processor.video_token)
        return processor(
            text=prompt, videos=[[_visual(i) for i in range(frames)]], num_frames=frames, return_tensors="pt"
        )
    return processor(text=prompt, images=[_visual(0)], return_tensors="pt")


def _visual_cache_mb(model, inputs) -> float:
    """MB the cache holds for the visual entries after one prefill (its tensors' bytes, in proportion)."""
    from saisa.compat import output_cache

    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    layout = cache.layout
    visual = int(layout.is_visual.sum())
    return total * visual / layout.positions.numel() / 2**20


def measure(repeats: int, device: str = "cpu") -> dict:
    from saisa.bench.flops import dims_from_config, prefill_flops
    from saisa.bench.timing import interleaved, medians
    from saisa.embedded import build_embedded_default
    from saisa.model.pruning import VisualPruning

    points = []
    for name, (side, tiles, frames) in SETTINGS.items():
        jobs, rows = {}, {}
        for arch in ARCHS:
            torch.manual_seed(0)
            model, processor = build_embedded_default(arch, image_size=side)
            model.to(device).eval()
            inputs = _inputs(processor, tiles, frames).to(device)
            ids = inputs["input_ids"]
            views = int((ids == processor.image_token_id).sum())
            text_tokens = int(ids.shape[1])  # the placeholders' columns are inert: counted as text, as the model runs
            dims = dims_from_config(model.config)
            for ratio in KEEP_RATIOS if arch != "naavit" else (1.0,):
                pruning = VisualPruning(ratio) if ratio < 1 else None
                model.config.set_visual_pruning(pruning)
                key = f"{arch} r={ratio:g}"
                flops = prefill_flops(dims, arch, text_tokens, images=views, lm_head=True, pruning=pruning)["total"]
                rows[key] = {
                    "architecture": arch,
                    "keep_ratio": ratio,
                    "views": views,
                    "visual_positions": views * model.tokens_per_image,
                    "prefill_tflops": flops / 1e12,
                    "visual_kv_mb": _visual_cache_mb(model, inputs),
                }
                if arch == "saisa" or pruning is None:  # LLaVA's pruning masks: its prefill takes as long as r=1's
                    jobs[key] = {"ttft_s": partial(_ttft_job, model, inputs, pruning)}
                    jobs[key]["ttft_s"]()()  # warm-up
            model.config.set_visual_pruning(None)
        measured = interleaved(jobs, repeats, device=device, description=f"TTFT, {name}")
        timed = {key: medians(seconds) for key, seconds in measured.items()}
        for key, row in rows.items():
            points.append({"setting": name, **row, "ttft_s": timed[key]["ttft_s"] if key in timed else None})
        logger.info("%s measured", name)
    return {"points": points}


def _ttft_job(model, inputs, pruning):
    """Set-up of a timed time to first token with `pruning` on (the model is shared by the ratios)."""
    from saisa.experiments.reproduce import first_token

    def run() -> None:
        model.config.set_visual_pruning(pruning)
        first_token(model, inputs)

    return run


def markdown(result: dict) -> str:
    lines = [
        "# Tiles, frames and visual K/V pruning: cost on the real embedded models",
        "",
        f"{run_line(result)} Prefill FLOPs are "
        "analytic (`saisa.bench.flops`, LLM and projectors, vision encoder excluded: it is the same for every "
        "architecture); KV MB is read from the real cache after a prefill (float32); TTFT is the median of "
        f"{result['repeats']} interleaved repeats of a prefill. LLaVA's pruning masks the pruned tokens in the HF "
        "path (FastV's FLOPs are counted as if removed; its TTFT is r=1's, not timed again), SAISA's removes them.",
        "",
        "| setting | architecture | r | visual positions | prefill TFLOPs | x LLaVA r=1 | visual KV MB | TTFT s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {p["setting"]: p for p in result["points"] if p["architecture"] == "llava" and p["keep_ratio"] == 1}
    for p in result["points"]:
        ref = base[p["setting"]]
        lines.append(
            f"| {p['setting']} | {p['architecture']} | {p['keep_ratio']:g} | {p['visual_positions']} | "
            f"{p['prefill_tflops']:.3f} | {p['prefill_tflops'] / ref['prefill_tflops']:.2f} | "
            f"{p['visual_kv_mb']:.1f} | {'-' if p['ttft_s'] is None else format(p['ttft_s'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(p["setting"] for p in result["points"]))
    figure, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        for arch, marker in zip(ARCHS, "osD", strict=True):
            points = [p for p in result["points"] if p["setting"] == setting and p["architecture"] == arch]
            axis.plot(
                [p["prefill_tflops"] for p in points], [p["visual_kv_mb"] for p in points], marker, ls="-", label=arch
            )
            for p in points:
                axis.annotate(f"r={p['keep_ratio']:g}", (p["prefill_tflops"], p["visual_kv_mb"]), fontsize=7)
        axis.set(title=setting, xlabel="prefill TFLOPs", ylabel="visual KV-cache MB")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    result = {**measure(args.repeats, args.device), "repeats": args.repeats}
    text = publish(
        result,
        Path(args.out),
        stem="views_efficiency",
        plot_name="views_efficiency.png",
        command="python -m saisa.experiments.views_efficiency " + " ".join(argv or []),
        started=start,
        markdown=markdown,
        plot=plot,
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
