"""The one stop rule: where an answer ends. `model.generate` (through `StopOnStrings`) and the server's step decoder
both end a row at its first stop string and cut the answer there with `stop_at`; both end it at a stop token from
`stop_token_ids`."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (chat models often end a turn with
    a token, e.g. `<|im_end|>`, that is not the tokenizer's EOS)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def stop_at(text: str, stop: list[str] | tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None if it holds none. Empty stop strings are ignored."""
    hits = [text.index(marker) for marker in stop if marker and marker in text]
    return min(hits) if hits else None


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...] = ()) -> str:
    """`text` up to its earliest stop string."""
    at = stop_at(text, stop)
    return text if at is None else text[:at]


def streamable(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """The part of an unfinished answer (holding no stop string yet) that is safe to send: without a trailing half
    multi-byte character, nor a tail that the next tokens may complete into a stop string."""
    text = text.rstrip("\ufffd")
    for marker in stop:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                text = text[:-size]
                break
    return text


class StopOnStrings(StoppingCriteria):
    """Ends a row of `model.generate` once its generated text holds a stop string. It decodes, so it works with every
    tokenizer (transformers' `stop_strings` needs a vocabulary whose tokens decode after a fixed prefix, which
    word-level tokenizers lack)."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        """input_ids (B, prompt_length + generated) -> (B,) whether each row's answer holds a stop string."""
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([stop_at(text, self.stop) is not None for text in texts], device=input_ids.device)
