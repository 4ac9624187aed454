"""`saisa merge-lora ADAPTER --base BASE --out OUT`: fold a LoRA adapter into its base model, save a plain folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="folder written by peft (adapter_config.json + weights)")
    parser.add_argument("--base", required=True, help="the saved model the adapter was trained on")
    parser.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from saisa import SaisaForConditionalGeneration
    from saisa.processing import SaisaProcessor

    base = SaisaForConditionalGeneration.from_pretrained(args.base)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out)
    SaisaProcessor.from_pretrained(args.base).save_pretrained(args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0
