"""`saisa ask MODEL_DIR --image PATH "question"`: one answer, streamed."""

from __future__ import annotations

import argparse

from saisa.checkpoints.loading import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved model folder (ours, LLaVA-1.5, llava-hf or an authors' SAISA release)")
    parser.add_argument("question")
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    add_device_arguments(parser)


def answer(model, processor, images, question: str, *, max_new_tokens: int = 64, stream: bool = False) -> str:
    from transformers import TextStreamer

    from saisa.inference.generation import answer_batch

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    return answer_batch(model, processor, [question], [images], max_new_tokens=max_new_tokens, streamer=streamer)[
        0
    ].strip()


def run(args: argparse.Namespace) -> int:
    from saisa.checkpoints.loading import load_pretrained
    from saisa.processing import open_image

    model, processor = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    answer(
        model,
        processor,
        [open_image(p) for p in args.image],
        args.question,
        max_new_tokens=args.max_new_tokens,
        stream=True,
    )
    return 0
