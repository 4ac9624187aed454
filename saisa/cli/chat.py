"""`saisa chat MODEL`: a terminal chat with streaming output; `/image PATH` attaches an image to the next message.

Earlier turns stay in the KV cache: each turn computes only its new tokens."""

from __future__ import annotations

import argparse

from saisa.checkpoints.loading import add_device_arguments

HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved model folder (model + processor)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from saisa.checkpoints.loading import load_pretrained
    from saisa.processing import open_image
    from saisa.serving.chat import ChatSession

    model, processor = load_pretrained(args.model, device=args.device, dtype=args.dtype, image_cache_mib=1024)
    session = ChatSession(model, processor, max_new_tokens=args.max_new_tokens)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    pending = []
    print(HELP)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending = []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            try:
                pending.append(open_image(path))
                print(f"(attached {path})")
            except (FileNotFoundError, ValueError) as error:
                print(f"(error: {error})")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        print("saisa> ", end="", flush=True)
        try:
            session.ask(line, pending, streamer=streamer, do_sample=args.sample)
        except ValueError as error:
            print(f"(error: {error})")
        pending = []
        print(f"(computed {session.last_new_tokens} new prompt tokens)")
