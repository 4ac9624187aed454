"""The one generation path: messages -> prompt -> `generate` -> text. `saisa ask`, `saisa eval`, `saisa chat` and the
lmms-eval plugin build their `generate` arguments here, so they stop on the same tokens; `saisa serve` advances its
requests a token at a time with `StepDecoder` and `TokenChooser`, the same forward calls with each row's own choice."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from saisa.compat import CACHE_KWARG, output_cache


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
    return answer_prompts(
        model,
        processor,
        prompts,
        images,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        streamer=streamer,
    )


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


class NonFiniteLogits(ArithmeticError):
    """A row's logits hold NaN or +inf: no token can be chosen from them."""


class TokenChooser:
    """Picks one row's next token from its logits: greedy when temperature is 0, else sampled after temperature and
    top-p with the row's own generator, so a seeded request draws the same tokens whatever it is batched with."""

    # Below this a temperature is greedy: dividing logits by 1e-300 overflows to inf and the softmax to NaN, and
    # sampling that sharp is argmax up to ties anyway.
    MIN_TEMPERATURE = 1e-4

    def __init__(self, *, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) -> a token id. Non-finite logits (NaN, +inf, or no finite value: an fp16 overflow) raise
        `NonFiniteLogits` rather than draw from a broken distribution."""
        logits = logits.float().cpu()
        if torch.isnan(logits).any() or torch.isposinf(logits).any() or not torch.isfinite(logits).any():
            raise NonFiniteLogits("the model's logits hold NaN or inf (a numerical overflow, e.g. in fp16)")
        if self.temperature < self.MIN_TEMPERATURE:
            return int(logits.argmax())
        probs = torch.softmax((logits - logits.max()) / self.temperature, -1)  # largest logit 0: no overflow
        if self.top_p < 1.0:  # the smallest set of most likely tokens holding top_p of the mass (at least one)
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


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
