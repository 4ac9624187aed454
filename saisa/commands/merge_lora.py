"""`saisa merge-lora ADAPTER --base BASE --out OUT`: fold a LoRA adapter into its base model, save a plain folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="folder written by peft (adapter_config.json + weights)")
    parser.add_argument("--base", required=True, help="the saved model the adapter was trained on")
    parser.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel

    from saisa.loading import load_pretrained
    from saisa.training.stages import expand_shared_projector

    base, processor = load_pretrained(args.base, device="cpu", dtype=torch.float32)
    # After align with a shared projector, instruct trains per-layer copies (run_training expands it before LoRA):
    # bring the base into the layout the adapter was trained in.
    if any(".layer_projectors." in name for name in _adapter_weight_names(Path(args.adapter))):
        expand_shared_projector(base)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0


def _adapter_weight_names(adapter: Path) -> list[str]:
    weights = adapter / "adapter_model.safetensors"
    if weights.exists():  # names only, without reading the tensors
        from safetensors import safe_open

        with safe_open(weights, "pt") as handle:
            return list(handle.keys())
    from peft.utils import load_peft_weights

    return list(load_peft_weights(str(adapter), device="cpu"))
