"""The one generation path: messages -> prompt -> `generate` -> text. `saisa ask`, `saisa eval`, `saisa chat` and the
lmms-eval plugin build their `generate` arguments here, so they stop and sample by the same rules (`stopping`,
`sampling`) as `saisa serve`, which advances its requests a token at a time with `decoding.StepDecoder`."""

from __future__ import annotations

import torch
from transformers import StoppingCriteriaList

from saisa.inference.sampling import Sampler
from saisa.inference.stopping import StopOnStrings, cut_at_stop, stop_token_ids


def user_prompt(processor, text: str, n_images: int) -> str:
    """One user turn holding `n_images` images then `text`, rendered with the generation prompt."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate_kwargs(
    model,
    processor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | tuple[str, ...] = (),
    prompt_length: int = 0,
    streamer=None,
) -> dict:
    """Arguments for `model.generate`: the `Sampler`'s choice (greedy when temperature is 0), EOS and padding from the
    tokenizer and the generation config, stop strings (a row halts once one appears in the text after the first
    `prompt_length` columns; `cut_at_stop` trims it)."""
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(model, processor.tokenizer),
        "pad_token_id": processor.tokenizer.pad_token_id,
        "streamer": streamer,
    }
    kwargs.update(Sampler(temperature=temperature, top_p=top_p).generate_kwargs())
    stop = [marker for marker in stop if marker]
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(processor.tokenizer, stop, prompt_length)])
    return kwargs


@torch.no_grad()
def answer_batch(model, processor, texts: list[str], images: list[list], **settings) -> list[str]:
    """One answer per (text, images) question, asked as a single user turn; batched with left padding. settings: as
    `answer_prompts` (max_new_tokens, temperature, top_p, stop, streamer)."""
    prompts = [user_prompt(processor, text, len(imgs)) for text, imgs in zip(texts, images, strict=True)]
    return answer_prompts(model, processor, prompts, images, **settings)


@torch.no_grad()
def answer_prompts(
    model,
    processor,
    prompts: list[str],
    images: list[list],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | tuple[str, ...] = (),
    streamer=None,
) -> list[str]:
    """One answer per rendered prompt (holding `<image>` once per image of its row); batched with left padding."""
    inputs = processor(text=prompts, images=[image for imgs in images for image in imgs] or None, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        **generate_kwargs(
            model,
            processor,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            prompt_length=prompt_length,
            streamer=streamer,
        ),
    )
    answers = processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    return [cut_at_stop(answer, stop) for answer in answers]
