"""FSDP2 `fully_shard` on each decoder layer of the LLM, then on the root, trains SAISA exactly as the unsharded
model does (2 CPU ranks under torchrun, gloo): the visual K/V of a layer are computed inside that layer's forward,
where FSDP has gathered its parameters. The checks run in tests/fsdp2_worker.py on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import torchrun


# The second case also gives the second rank no image at all: its visual weights must still take part in the same
# gathers and reductions as the first rank's (a phantom image, see SaisaForConditionalGeneration._phantom_image).
@pytest.mark.parametrize(
    "flags", [[], ["--checkpointing", "--text-only-rank"]], ids=["plain", "activation-checkpointing+text-only-rank"]
)
def test_fully_shard_per_decoder_layer_matches_unsharded_training(flags):
    here = Path(__file__).parent
    run = torchrun(str(here / "fsdp2_worker.py"), *flags, cwd=here)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert run.stdout.count("match unsharded") == 2, run.stdout
