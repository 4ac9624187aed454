"""The lmms-eval model classes (imported by lmms-eval only) over a saved saisa model folder: `SaisaLMM`, the "simple"
interface (`generate_until` from a context string and `doc_to_visual`, `loglikelihood`), and `SaisaChatLMM`, the chat
interface (`is_simple = False`: `generate_until` from the task's `doc_to_messages`, rendered with the model's chat
template). `--model saisa` gives the first, `--model saisa_chat` the second.

`--batch_size auto` (or `auto:N`): the largest batch up to `max_batch_size` (default 64) that fits, found by halving
on out-of-memory.
"""

from __future__ import annotations

import logging

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from saisa.inference.generation import answer_batch, answer_prompts
from saisa.inference.scoring import continuation_loglikelihood

logger = logging.getLogger(__name__)

AUTO_MAX_BATCH = 64


def _visuals(doc_to_visual, doc) -> list:
    visuals = doc_to_visual(doc) if doc_to_visual is not None else []
    return [v for v in (visuals or []) if v is not None]


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> tuple[int, bool]:
    """(batch size to start with, whether it adapts): an int, or lmms-eval's "auto" / "auto:N"."""
    if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
        return int(max_batch_size or AUTO_MAX_BATCH), True
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return size, False


def _settings(gen_kwargs: dict) -> dict:
    """A task's generation arguments as `answer_batch` / `answer_prompts` take them (`until`: the stop strings)."""
    until = gen_kwargs.get("until", [])
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 32)),
        "stop": [until] if isinstance(until, str) else list(until),
        "temperature": float(gen_kwargs.get("temperature", 0.0)),
    }


class SaisaLMM(lmms):
    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        from saisa.checkpoints.loading import load_pretrained

        self.model, self.processor = load_pretrained(pretrained, device=device, dtype=dtype)
        self.batch_size_per_gpu, self.auto_batch_size = parse_batch_size(batch_size, max_batch_size)

    def _batched(self, requests: list, run, desc: str) -> list:
        """`run` over consecutive chunks of `requests`; with an automatic batch size, a chunk that runs out of memory
        is retried at half the size (which then stays)."""
        results, start = [], 0
        with tqdm(total=len(requests), desc=desc) as progress:
            while start < len(requests):
                chunk = requests[start : start + self.batch_size_per_gpu]
                try:
                    results += run(chunk)
                except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                    if not (self.auto_batch_size and _out_of_memory(error) and self.batch_size_per_gpu > 1):
                        raise
                    self.batch_size_per_gpu //= 2
                    logger.warning("out of memory: batch size now %d", self.batch_size_per_gpu)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                start += len(chunk)
                progress.update(len(chunk))
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def run(chunk: list[Instance]) -> list[str]:
            texts, images, gen_kwargs = [], [], chunk[0].args[1]
            for request in chunk:
                context, _, doc_to_visual, doc_id, task, split = request.args
                texts.append(context)
                images.append(_visuals(doc_to_visual, self.task_dict[task][split][doc_id]))
            answers = answer_batch(self.model, self.processor, texts, images, **_settings(gen_kwargs))
            return [a.strip() for a in answers]

        return self._batched(requests, run, "saisa generate_until")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="saisa loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            scored = continuation_loglikelihood(
                self.model, self.processor, context, _visuals(doc_to_visual, doc), continuation
            )
            # lmms-eval 0.7.3 turns any plain tuple response into its str(); wrapped, the (logprob, is_greedy) pair
            # reaches the task's process_results intact.
            results.append(GenerationResult(text=scored))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("saisa: multi-round generation is not implemented for lmms-eval")


class SaisaChatLMM(SaisaLMM):
    """lmms-eval's chat interface: each request's messages (lmms-eval's protocol: content lists of text and image
    items) rendered with the model's chat template, images in the order the messages hold them."""

    is_simple = False

    def _prompt(self, messages) -> tuple[str, list]:
        from lmms_eval.protocol import ChatMessages

        from saisa.processing.images import content_image

        hf_messages = ChatMessages(messages=messages).to_hf_messages()
        images = []
        for message in hf_messages:
            for item in message["content"]:
                if item["type"] == "image":
                    images.append(content_image(item, len(images)))
                elif item["type"] != "text":
                    raise ValueError(f"saisa models read text and images; this request holds {item['type']!r} content")
        prompt = self.processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        return prompt, images

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def run(chunk: list[Instance]) -> list[str]:
            prompts, images, gen_kwargs = [], [], chunk[0].args[2]
            for request in chunk:
                _, doc_to_messages, _, doc_id, task, split = request.args
                prompt, row_images = self._prompt(doc_to_messages(self.task_dict[task][split][doc_id]))
                prompts.append(prompt)
                images.append(row_images)
            answers = answer_prompts(self.model, self.processor, prompts, images, **_settings(gen_kwargs))
            return [a.strip() for a in answers]

        return self._batched(requests, run, "saisa chat generate_until")
