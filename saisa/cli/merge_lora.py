"""`saisa merge-lora ADAPTER --base BASE --out OUT`: fold a LoRA adapter into its base model, save a plain folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="folder written by peft (adapter_config.json + weights)")
    parser.add_argument("--base", required=True, help="the saved model the adapter was trained on")
    parser.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    from saisa.training.lora import merge_lora

    merge_lora(args.adapter, args.base, args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0
