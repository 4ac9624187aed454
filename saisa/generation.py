"""The one generation path: messages -> prompt -> `generate` -> text. `saisa ask`, `saisa eval`, `saisa chat`,
`saisa serve` and the lmms-eval plugin all build their `generate` arguments here, so they stop on the same tokens."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def user_prompt(processor, text: str, n_images: int) -> str:
    """One user turn holding `n_images` images then `text`, rendered with the generation prompt."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config (chat models often end a turn with
    a token, e.g. `<|im_end|>`, that is not the tokenizer's EOS)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


class StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text holds a stop string. It decodes, so it works with every tokenizer
    (transformers' `stop_strings` needs a vocabulary whose tokens decode after a fixed prefix, which word-level
    tokenizers lack)."""

    def __init__(self, tokenizer, stop: list[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(marker in text for marker in self.stop) for text in texts], device=input_ids.device)


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
    """Arguments for `model.generate`: greedy when temperature is 0, EOS and padding from the tokenizer and the
    generation config, stop strings (a row halts once one appears in the text after the first `prompt_length`
    columns; `cut_at_stop` trims it)."""
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_token_ids(model, processor.tokenizer),
        "pad_token_id": processor.tokenizer.pad_token_id,
        "streamer": streamer,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    stop = [marker for marker in stop if marker]
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(processor.tokenizer, stop, prompt_length)])
    return kwargs


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...] = ()) -> str:
    """`text` up to the first stop string."""
    for marker in stop:
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text


@torch.no_grad()
def answer_batch(
    model,
    processor,
    texts: list[str],
    images: list[list],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | tuple[str, ...] = (),
    streamer=None,
) -> list[str]:
    """One answer per (text, images) question, asked as a single user turn; batched with left padding."""
    prompts = [user_prompt(processor, text, len(imgs)) for text, imgs in zip(texts, images, strict=True)]
    inputs = processor(prompts, images=[image for imgs in images for image in imgs] or None)
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
