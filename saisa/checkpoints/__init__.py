"""Saved folders in and out: the one loader (`loading.load_pretrained`), the one pairing of a model with its processor
(`assembly`), conversions in from LLaVA-1.5, llava-hf and the authors' SAISA releases (`foreign`), export out to
llava-hf (`export_llava_hf`)."""

from saisa.checkpoints.loading import load_pretrained

__all__ = ["load_pretrained"]
