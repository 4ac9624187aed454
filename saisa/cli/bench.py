"""`saisa bench`: SAISA vs our LLaVA-1.5 vs transformers' `LlavaForConditionalGeneration`, same dimensions, one process
(`saisa.bench.compare`)."""

from __future__ import annotations

import argparse
import json

from saisa.cli import settings_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--vision-hidden",
        type=int,
        default=64,
        help="CLIP tower width (default tiny: its cost is common to all; 1024 = ViT-L)",
    )
    parser.add_argument("--vision-layers", type=int, default=1, help="CLIP tower depth (24 = ViT-L/14-336)")
    parser.add_argument("--text-tokens", "-t", type=int, default=64)
    parser.add_argument("--visual-tokens", "-v", type=int, default=576, help="must be a square number")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    parser.add_argument(
        "--image-cache",
        action="store_true",
        help="instead: SAISA time to first token for a cold image vs the same image again",
    )
    parser.add_argument("--out", default="docs/bench", help="folder for bench.json and bench.png")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: measure one model's peak memory


def run(args: argparse.Namespace) -> int:
    from saisa.bench.compare import BenchSettings, memory_probe, run_bench, summary

    settings = settings_from(BenchSettings, args)
    if args.memory_probe:  # the fresh process `run_bench` starts per model
        print(json.dumps({"peak_bytes": memory_probe(args.memory_probe, settings)}))
    else:
        print(summary(run_bench(settings)))
    return 0
