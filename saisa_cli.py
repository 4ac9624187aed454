"""`saisa` command line: the verbs are the table of contents of the project.

It lives outside the `saisa` package, whose import loads torch and transformers (to register the Auto classes), so
that `saisa --help` answers at once; a verb's module is imported only when that verb is asked for.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# verb -> (module, help). Each module exposes `add_arguments(parser)` and `run(args)`; imported only when used.
VERBS = {
    "demo": (
        "saisa.cli.demo",
        "the embedded default end to end: real SmolLM2 + EfficientNet-Lite0 on real images",
    ),
    "train": ("saisa.cli.train", "train one stage (align / instruct) from a YAML recipe, CPU to many GPUs"),
    "merge-lora": ("saisa.cli.merge_lora", "merge a LoRA adapter into its base model"),
    "chat": ("saisa.cli.chat", "terminal chat with streaming, images by path, KV cache kept across turns"),
    "serve": (
        "saisa.cli.serve",
        "OpenAI-compatible HTTP server (chat completions, SSE streaming, image KV cache)",
    ),
    "eval": ("saisa.cli.eval", "evaluate a saved model on short-answer / multiple-choice / yes-no questions"),
    "reproduce": ("saisa.cli.reproduce", "train and compare saisa / llava / naavit on the embedded default"),
    "flops": ("saisa.cli.flops", "analytic inference/training FLOPs: LLaVA-1.5 vs NAAViT vs SAISA vs Flamingo"),
    "bench": ("saisa.cli.bench", "time SAISA vs LLaVA vs transformers' Llava: TTFT, decode, memory, train step"),
    "convert": ("saisa.cli.convert", "convert LLaVA-1.5 / SAISA-release / llava-hf checkpoints (and back)"),
    "ask": ("saisa.cli.ask", "answer one question about one or more images with a saved model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="saisa", description="SAISA multimodal LLMs: build, train, serve, evaluate.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    asked = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no options but -h
    module = None
    for verb, (module_name, help_text) in VERBS.items():
        subparser = verbs.add_parser(verb, help=help_text, description=help_text)
        if verb == asked:
            module = importlib.import_module(module_name)
            module.add_arguments(subparser)
    args = parser.parse_args(argv)
    # The library reports progress through `logging`: a command shows saisa's own messages on stderr (other libraries'
    # warnings reach it through logging's last-resort handler). Removed afterwards: main() may run again in-process.
    shown, saisa_logger = logging.StreamHandler(), logging.getLogger("saisa")
    shown.setFormatter(logging.Formatter("%(message)s"))
    level = saisa_logger.level
    saisa_logger.addHandler(shown)
    saisa_logger.setLevel(logging.INFO)
    try:
        return module.run(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"saisa {args.verb}: error: {error}", file=sys.stderr)
        return 2
    finally:
        saisa_logger.removeHandler(shown)
        saisa_logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
