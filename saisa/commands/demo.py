"""`saisa demo`: build the embedded default (real SmolLM2-135M-Instruct + real EfficientNet-Lite0) and ask it about a
real photo. Until the projectors are trained (`saisa train`), the visual answer is noise: the demo says so."""

from __future__ import annotations

import argparse
import time

from saisa.commands.ask import answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--architecture", choices=["saisa", "llava", "naavit"], default="saisa")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from skimage import data

    from saisa.embedded import build_embedded_default

    start = time.perf_counter()
    model, processor = build_embedded_default(args.architecture)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"built {args.architecture} on SmolLM2-135M-Instruct + EfficientNet-Lite0 "
          f"({params:.0f} M parameters, {model.tokens_per_image} visual tokens per image) "
          f"in {time.perf_counter() - start:.1f} s")
    photo = Image.fromarray(data.chelsea())  # a real photo of a cat, shipped with scikit-image
    question = "What animal is in this picture?"
    print(f"Q (about skimage.data.chelsea, a cat): {question}")
    print("A: ", end="", flush=True)
    answer(model, processor, [photo], question, max_new_tokens=args.max_new_tokens, stream=True)
    print("note: the projectors are untrained, so the answer above is noise; train them with `saisa train`.")
    print("text-only check (the LLM itself is intact):")
    print("A: ", end="", flush=True)
    answer(model, processor, [], "What is the capital of France?", max_new_tokens=16, stream=True)
    return 0
