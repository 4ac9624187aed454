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
    from saisa.interop import detect_layout, export_llava_hf, load_foreign, processor_for_foreign

    if args.to == "llava-hf":
        import torch

        from saisa.loading import load_pretrained

        model, processor = load_pretrained(args.source, device="cpu", dtype=torch.float32)
        export_llava_hf(model, args.destination, processor)
        print(f"wrote {args.destination} (transformers LlavaForConditionalGeneration and LlavaProcessor layout)")
        return 0
    layout = detect_layout(args.source)
    model = load_foreign(args.source, architecture=args.architecture)
    processor = processor_for_foreign(args.source, model, template=args.template)
    model.save_pretrained(args.destination)
    processor.save_pretrained(args.destination)
    print(
        f"converted {layout} checkpoint {args.source} -> {args.destination} "
        f"(architecture {model.config.architecture}, template {processor.template or 'tokenizer'})"
    )
    return 0
