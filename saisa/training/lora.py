"""A LoRA adapter folded into the model it was trained on, written as a plain `from_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from saisa.checkpoints.loading import load_pretrained
from saisa.training.stages import expand_shared_projector


def merge_lora(adapter: str | Path, base: str | Path, out: str | Path) -> None:
    """`adapter`: a folder peft wrote (adapter_config.json + weights); `base`: the saved model it was trained on."""
    from peft import PeftModel  # the `train` extra

    model, processor = load_pretrained(base, device="cpu", dtype=torch.float32)
    # After align with a shared projector, instruct trains per-layer copies (run_training expands it before LoRA):
    # bring the base into the layout the adapter was trained in.
    if any(".layer_projectors." in name for name in _adapter_weight_names(Path(adapter))):
        expand_shared_projector(model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    processor.save_pretrained(out)


def _adapter_weight_names(adapter: Path) -> list[str]:
    weights = adapter / "adapter_model.safetensors"
    if weights.exists():  # names only, without reading the tensors
        from safetensors import safe_open

        with safe_open(weights, "pt") as handle:
            return list(handle.keys())
    from peft.utils import load_peft_weights

    return list(load_peft_weights(str(adapter), device="cpu"))
