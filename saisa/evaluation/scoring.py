"""Model-side primitives that evaluation harnesses call: batched answers and continuation log-likelihoods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chat_prompt(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


@torch.no_grad()
def answer_batch(model, processor, texts: list[str], images: list[list], *, max_new_tokens: int = 32,
                 stop: list[str] | None = None, temperature: float = 0.0) -> list[str]:
    """Greedy (or sampled) answers for a batch of (text, images) questions, cut at the first stop string."""
    prompts = [chat_prompt(processor, text, len(imgs)) for text, imgs in zip(texts, images)]
    flat = [image for imgs in images for image in imgs]
    inputs = processor(prompts, images=flat or None)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id,
                         **sampling)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    cut = []
    for answer in answers:
        for marker in stop or []:
            if marker and marker in answer:
                answer = answer[: answer.index(marker)]
        cut.append(answer)
    return cut


@torch.no_grad()
def continuation_loglikelihood(model, processor, text: str, images: list, continuation: str) -> tuple[float, bool]:
    """log p(continuation | question with images), and whether greedy decoding would produce it."""
    prompt = chat_prompt(processor, text, len(images))
    context = processor(prompt, images=images or None)
    target = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([context["input_ids"], target], 1)
    logits = model(input_ids=ids, pixel_values=context.get("pixel_values"), use_cache=False).logits
    predicted = logits[0, context["input_ids"].shape[1] - 1: -1]  # (n_target, vocab): positions that predict it
    logprobs = F.log_softmax(predicted.float(), -1)
    chosen = logprobs.gather(1, target[0][:, None]).squeeze(1)
    return float(chosen.sum()), bool((predicted.argmax(-1) == target[0]).all())
