"""`saisa convert SRC DST`: a LLaVA-1.5 / SAISA-release / llava-hf folder -> our layout (model + processor).
`--to llava-hf` goes the other way for `llava` models."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument(
        "--architecture",
        choices=["saisa", "llava", "naavit"],
        help="default: what the checkpoint is; 'saisa' on a LLaVA checkpoint starts SAISA from its "
        "LLM and vision tower (new projectors, ready for stage align)",
    )
    parser.add_argument("--template", help="conversation template for the processor (default: from the tokenizer)")
    parser.add_argument("--to", choices=["saisa", "llava-hf"], default="saisa")


def run(args: argparse.Namespace) -> int:
    if args.to == "llava-hf":
        from saisa.checkpoints.export_llava_hf import export_folder

        export_folder(args.source, args.destination)
        print(f"wrote {args.destination} (transformers LlavaForConditionalGeneration and LlavaProcessor layout)")
        return 0
    from saisa.checkpoints.foreign import convert_folder

    layout, model, processor = convert_folder(
        args.source, args.destination, architecture=args.architecture, template=args.template
    )
    print(
        f"converted {layout} checkpoint {args.source} -> {args.destination} "
        f"(architecture {model.config.architecture}, template {processor.template or 'tokenizer'})"
    )
    return 0
