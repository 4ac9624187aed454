"""The `saisa` command's verbs: each module parses its flags and calls one library function.

The verb table and `main` live in `saisa_cli` (outside the package, so that `saisa --help` does not import torch);
`python -m saisa.cli VERB ...` runs the same command (as `accelerate launch` and `torchrun` need a module).
"""

from __future__ import annotations

import argparse
import dataclasses

from saisa_cli import VERBS, main

__all__ = ["VERBS", "main", "settings_from"]


def settings_from(cls, args: argparse.Namespace):
    """A settings dataclass filled from the parsed flags of the same names (the flags are the settings' interface)."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
