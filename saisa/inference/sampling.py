"""The one sampler: how a next token is chosen from logits. `model.generate` and the server's step decoder use the same
`Sampler`: greedy, or transformers' temperature and top-p warpers followed by a draw from the softmax."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


class NonFiniteLogits(ArithmeticError):
    """A row's logits hold NaN or +inf: no token can be chosen from them."""


class Sampler:
    """Greedy when temperature is below `MIN_TEMPERATURE`, else sampled after temperature then top-p (the order
    `generate` applies them). The step decoder draws with the request's own seeded generator, so a seeded request
    draws the same tokens whatever it is batched with; `generate` draws with torch's global generator."""

    # Below this a temperature is greedy: dividing logits by 1e-300 overflows to inf and the softmax to NaN, and
    # sampling that sharp is argmax up to ties anyway.
    MIN_TEMPERATURE = 1e-4

    def __init__(self, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.greedy = temperature < self.MIN_TEMPERATURE
        warpers = [] if self.greedy else [TemperatureLogitsWarper(temperature)]
        if not self.greedy and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def generate_kwargs(self) -> dict:
        """This choice as `model.generate` arguments. Sampling turns `generate`'s own warpers off (its defaults
        would add top-k 50) and passes ours, so both paths sample from the same distribution."""
        off = {"temperature": None, "top_p": None, "top_k": None}
        if self.greedy:
            return {"do_sample": False, **off}
        return {"do_sample": True, **off, "logits_processor": self.warpers}

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) -> a token id. Non-finite logits (NaN, +inf, or no finite value: an fp16 overflow) raise
        `NonFiniteLogits` rather than draw from a broken distribution."""
        logits = logits.float().cpu()
        if torch.isnan(logits).any() or torch.isposinf(logits).any() or not torch.isfinite(logits).any():
            raise NonFiniteLogits("the model's logits hold NaN or inf (a numerical overflow, e.g. in fp16)")
        if self.greedy:
            return int(logits.argmax())
        scores = self.warpers(torch.empty(1, 0, dtype=torch.long), logits[None])  # (1, V); the warpers read no ids
        probs = torch.softmax(scores, -1)  # (1, V)
        return int(torch.multinomial(probs, 1, generator=self.generator))
