"""The step decoder the server drives: a batch advanced one token per step, whose rows may leave between steps, and
the log-probabilities it reports. Each row chooses its tokens with its own `saisa.inference.sampling.Sampler`."""

from __future__ import annotations

import torch

from saisa.compat import CACHE_KWARG, output_cache


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution (before temperature and top-p), and the `top` likeliest tokens."""
    logprobs = torch.log_softmax(logits.float(), -1)
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist(), strict=True))


class StepDecoder:
    """A batch decoded one token per `step`, whose rows may leave between steps (`keep`).

    `model.generate` runs a batch to its end; a server instead advances several such batches in turn, a step each,
    and drops the rows that are done, so a short request never waits for a long one. Prefill and steps are the same
    forward calls `generate` makes (left-padded prompts, then one token per row with the cache), so greedy answers
    are `generate`'s."""

    @torch.no_grad()
    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values=None):
        """input_ids, attention_mask (B, T), left-padded; pixel_values (N, 3, S, S), every row's images in order."""
        self.model = model
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, self.logits = output_cache(out), out.logits[:, -1]  # logits (B, V): each row's next token

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its chosen token; returns the next logits (B, V)."""
        return self.extend(torch.tensor(tokens, device=self.logits.device)[:, None])

    @torch.no_grad()
    def extend(self, input_ids: torch.Tensor, pixel_values=None) -> torch.Tensor:
        """Feed more tokens (B, T) to every row, no padding (a prompt prefilled in chunks, or one decoding step);
        pixel_values: the images of their `<image>` tokens. Returns the logits after them (B, V)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_KWARG: self.cache},
        )
        self.logits = out.logits[:, -1]
        return self.logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the current batch), in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.logits = self.logits[index]
