"""`saisa ask MODEL_DIR --image PATH "question"`: one answer, streamed."""

from __future__ import annotations

import argparse

import torch
from transformers import TextStreamer

from saisa.evaluation.scoring import chat_prompt
from saisa.processing import SaisaProcessor, load_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="folder written by save_pretrained (model + processor)")
    parser.add_argument("question")
    parser.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)


def answer(model, processor, images, question: str, *, max_new_tokens: int = 64, stream: bool = False) -> str:
    inputs = processor(chat_prompt(processor, question, len(images)), images=images)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    from saisa import SaisaForConditionalGeneration

    model = SaisaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = SaisaProcessor.from_pretrained(args.model)
    answer(model, processor, [load_image(p) for p in args.image], args.question,
           max_new_tokens=args.max_new_tokens, stream=True)
    return 0
