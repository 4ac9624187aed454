"""A generation engine shared by concurrent requests: one worker thread owns the model; requests queue up and are
run together as one left-padded batch when their sampling settings agree. Nothing is dropped: a request waits
until a batch takes it. Tokens stream back per request as they are produced."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from saisa.generation import generate_kwargs, stop_token_ids


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Job:
    prompt: str
    images: list
    max_tokens: int
    sampling: Sampling
    on_token: object = None  # callable(text_delta: str) called from the worker thread
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _BatchStreamer(BaseStreamer):
    """Routes each step's (B,) new tokens to the B jobs; a job stops at EOS or its own max_tokens."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.view(-1).tolist(), strict=True):
            if job.finish_reason is not None:
                continue
            if token in self.eos_ids:
                job.finish_reason = "stop"
                continue
            job.tokens.append(token)
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a half multi-byte character
                delta, job.text = text[len(job.text) :], text
                if delta and job.on_token is not None:
                    job.on_token(delta)
            if len(job.tokens) >= job.max_tokens:
                job.finish_reason = "length"

    def end(self) -> None:
        for job in self.jobs:
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            delta, job.text = text[len(job.text) :], text
            if delta and job.on_token is not None:
                job.on_token(delta)
            if job.finish_reason is None:
                job.finish_reason = "length"


class GenerationEngine:
    def __init__(self, model, processor, *, max_batch_size: int = 8, batch_window_s: float = 0.01):
        self.model, self.processor = model, processor
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="saisa-engine", daemon=True)
        self._worker.start()
        self.eos_ids = set(stop_token_ids(model, processor.tokenizer))
        self.batches_run = 0

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    def generate(self, job: Job, timeout: float | None = None) -> Job:
        self.submit(job).done.wait(timeout)
        if job.error is not None:
            raise job.error
        return job

    def _run(self) -> None:
        pending: list[Job] = []
        while True:
            if not pending:
                pending.append(self._queue.get())
            deadline = time.monotonic() + self.batch_window_s
            while len(pending) < 4 * self.max_batch_size:
                try:
                    pending.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            head = pending[0].sampling
            batch = [job for job in pending if job.sampling == head][: self.max_batch_size]
            pending = [job for job in pending if job not in batch]
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            processor = self.processor
            images = [image for job in batch for image in job.images]
            inputs = processor([job.prompt for job in batch], images=images or None)
            for job, mask in zip(batch, inputs["attention_mask"], strict=True):
                job.prompt_tokens = int(mask.sum())
            sampling = batch[0].sampling
            if not sampling.greedy and sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            settings = generate_kwargs(
                self.model,
                processor,
                max_new_tokens=max(job.max_tokens for job in batch),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                streamer=_BatchStreamer(batch, processor.tokenizer, self.eos_ids),
            )
            with torch.no_grad():
                self.model.generate(**inputs, **settings)
            self.batches_run += 1
        except Exception as error:  # reported to every request of the batch, the worker lives on
            for job in batch:
                job.error = error
        finally:
            for job in batch:
                job.done.set()
                if job.on_token is not None:
                    job.on_token(None)  # end of stream
