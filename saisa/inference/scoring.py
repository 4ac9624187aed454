"""Scoring a given continuation (multiple-choice harnesses); answers come from `saisa.inference.generation`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saisa.inference.generation import user_prompt


@torch.no_grad()
def continuation_loglikelihood(model, processor, text: str, images: list, continuation: str) -> tuple[float, bool]:
    """log p(continuation | question with images), and whether greedy decoding would produce it."""
    prompt = user_prompt(processor, text, len(images))
    context = processor(text=prompt, images=images or None, return_tensors="pt")
    target = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([context["input_ids"], target], 1)
    target = target.to(model.device)
    logits = model(input_ids=ids, pixel_values=context.get("pixel_values"), use_cache=False).logits
    predicted = logits[0, context["input_ids"].shape[1] - 1 : -1]  # (n_target, vocab): positions that predict it
    logprobs = F.log_softmax(predicted.float(), -1)
    chosen = logprobs.gather(1, target[0][:, None]).squeeze(1)
    return float(chosen.sum()), bool((predicted.argmax(-1) == target[0]).all())
