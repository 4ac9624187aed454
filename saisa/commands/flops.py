"""`saisa flops`: analytic inference and training FLOPs of LLaVA-1.5, NAAViT, SAISA and Flamingo-style models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saisa.flops import ARCHITECTURES, PRESETS, dims_from_config, report, with_visual_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="vicuna-7b")
    source.add_argument("--config", help="a saved model folder (its config.json)")
    parser.add_argument("--text-tokens", "-t", type=int, default=64)
    parser.add_argument("--visual-tokens", "-v", type=int, help="override v (tokens per image)")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--plot", help="write a PNG of the reduction against text length here")


def _tf(x: float) -> str:
    return f"{x / 1e12:9.3f}"


def run(args: argparse.Namespace) -> int:
    if args.config:
        from saisa import SaisaConfig

        dims = dims_from_config(SaisaConfig.from_pretrained(args.config), name=args.config)
    else:
        dims = PRESETS[args.preset]
    dims = with_visual_tokens(dims, args.visual_tokens)
    rep = report(dims, args.text_tokens)
    t, v = args.text_tokens, dims.visual_tokens
    print(
        f"{dims.name}: h={dims.hidden} m={dims.ffn} L={dims.layers} heads={dims.heads}/{dims.kv_heads} "
        f"v={v} t={t}  (TFLOPs, vision encoder excluded)"
    )
    print(f"{'architecture':<10} {'prefill':>9} {'vs llava':>9} {'decode/tok':>11} {'KV cache':>10}")
    llava = rep["prefill"]["llava"]["total"]
    for arch in ARCHITECTURES:
        total = rep["prefill"][arch]["total"]
        print(
            f"{arch:<10} {_tf(total)} {100 * (total / llava - 1):+8.1f}% "
            f"{rep['decode_per_token'][arch] / 1e9:9.2f} G {rep['kv_cache_bytes_bf16'][arch] / 2**20:7.1f} MiB"
        )
    if dims.vision_flops:
        print(f"vision encoder: {_tf(dims.vision_flops)} TFLOPs per image (all architectures)")
    print("\nprefill reduction against text length (vs LLaVA-1.5):")
    print(f"{'t':>6} {'naavit':>8} {'saisa':>8} {'flamingo':>9}")
    for row in rep["reduction_vs_text_length"]:
        print(
            f"{row['text_tokens']:>6} {100 * row['naavit_reduction']:7.1f}% {100 * row['saisa_reduction']:7.1f}% "
            f"{100 * row['flamingo_reduction']:8.1f}%"
        )
    recipe = rep["training"]["recipe"]
    print(
        f"\ntraining (LLaVA-1.5 recipe: 558K align at t=64, 665K instruct at t=512): SAISA/LLaVA FLOPs = "
        f"{recipe['ratio']:.2f} (paper: 0.74 in GPU hours)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        _plot(dims, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot(dims, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saisa.flops import reduction_table

    lengths = list(range(16, 2049, 16))
    rows = reduction_table(dims, lengths)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for arch in ("saisa", "naavit", "flamingo"):
        ax.plot(lengths, [100 * r[f"{arch}_reduction"] for r in rows], label=arch)
    ax.set_xlabel("text tokens t")
    ax.set_ylabel("prefill FLOPs saved vs LLaVA-1.5 (%)")
    ax.set_title(f"{dims.name}, v = {dims.visual_tokens}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
