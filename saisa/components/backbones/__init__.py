"""Decoder-LLM families, one file each: every module in this folder is imported here and registers its family with
`register_decoder_family` (saisa.components.backbones.base). A family outside saisa registers the same way."""

import importlib
import pkgutil

from saisa.components.backbones.base import DECODER_FAMILIES, DecoderFamily, decoder_family, register_decoder_family

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DECODER_FAMILIES", "DecoderFamily", "decoder_family", "register_decoder_family"]
