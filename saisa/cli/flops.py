"""`saisa flops`: analytic inference and training FLOPs of LLaVA-1.5, NAAViT, SAISA and Flamingo-style models
(`saisa.bench.flops`)."""

from __future__ import annotations

import argparse

from saisa.bench.flops import PRESETS, analyse, dims_from_config, with_visual_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="vicuna-7b")
    source.add_argument("--config", help="a saved model folder (its config.json)")
    parser.add_argument("--text-tokens", "-t", type=int, default=64)
    parser.add_argument("--visual-tokens", "-v", type=int, help="override v (tokens per image)")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--plot", help="write a PNG of the reduction against text length here")


def run(args: argparse.Namespace) -> int:
    if args.config:
        from saisa import SaisaConfig

        dims = dims_from_config(SaisaConfig.from_pretrained(args.config), name=args.config)
    else:
        dims = PRESETS[args.preset]
    dims = with_visual_tokens(dims, args.visual_tokens)
    print(analyse(dims, args.text_tokens, json_path=args.json, plot_path=args.plot))
    return 0
