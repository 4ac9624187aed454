"""A generation engine shared by concurrent requests, with iteration-level scheduling: one worker thread owns the
model and, at every step, admits the requests that have arrived as a new group (one left-padded prefill), then
advances every running group by one token (`saisa.generation.StepDecoder`). A row leaves its group the moment it is
done (end of sequence, a stop string, its own `max_tokens`, its deadline, or its client gone), so a short request
never waits for a long one it shares a group with or arrived after.

Each request chooses its own tokens (temperature, top-p, its own seeded generator), so requests with different
settings share a group and a seeded request draws the same tokens batched or alone. A group whose prefill fails is
retried one request at a time: one request's bad input fails that request only."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from saisa.generation import StepDecoder, TokenChooser, stop_token_ids, token_logprobs


class QueueFull(Exception):
    """The engine holds as many waiting requests as it accepts."""


class JobTimeout(Exception):
    """A request ran past its deadline (queued and generating together)."""


@dataclass
class Job:
    input_ids: torch.Tensor  # (T,) this request's prompt, tokenised by the request's own thread
    pixel_values: torch.Tensor | None  # (N, 3, S, S) its images, preprocessed there too
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; else the chosen token's and this many alternatives'
    prompt_tokens: int = 0  # positions the prompt takes, each image's visual tokens included (for usage)
    deadline: float | None = None  # time.monotonic() after which the request fails with JobTimeout
    on_token: object = None  # callable(text_delta: str | None), called from the worker thread; None ends the stream
    on_done: object = None  # callable(), called from the worker thread once the job is finished
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the answer so far (cut at a stop string once one appears)
    emitted: str = ""  # the part of `text` already passed to on_token
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    cancelled: bool = False  # set by the server when the client has gone; the worker then drops the job

    def __post_init__(self):
        self.chooser = TokenChooser(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def cancel(self) -> None:
        self.cancelled = True


class _Group:
    """Jobs prefilled together; rows of `decoder` in the order of `jobs`."""

    def __init__(self, jobs: list[Job], decoder: StepDecoder):
        self.jobs, self.decoder = jobs, decoder


class GenerationEngine:
    def __init__(
        self,
        model,
        processor,
        *,
        max_batch_size: int = 8,
        max_running: int | None = None,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
    ):
        """max_batch_size: requests prefilled together as one group; max_running: requests decoding at once (default
        2 x max_batch_size); max_queue: requests waiting beyond those (`submit` raises QueueFull past it);
        batch_window_s: how long an idle engine waits for batch-mates of a first request."""
        self.model, self.tokenizer = model, processor.tokenizer
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_running = max_running or 2 * max_batch_size
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.eos_ids = set(stop_token_ids(model, self.tokenizer))
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._groups: list[_Group] = []
        # groups prefilled, steps run, and how requests ended (counted in /health)
        self.stats = {"batches_run": 0, "steps_run": 0, "finished": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self._worker = threading.Thread(target=self._run, name="saisa-engine", daemon=True)
        self._worker.start()

    def load(self) -> dict:
        """Requests waiting and decoding now."""
        return {"waiting": self._queue.qsize(), "running": sum(len(g.jobs) for g in self._groups)}

    def submit(self, job: Job) -> Job:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job

    # -- the worker ----------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._admit()
            for group in list(self._groups):
                self._advance(group)

    def _admit(self) -> None:
        """Start the waiting requests (up to max_batch_size, within max_running) as one new group."""
        room = min(self.max_batch_size, self.max_running - sum(len(g.jobs) for g in self._groups))
        if room <= 0:
            return
        jobs = []
        if not self._groups:  # idle: wait for a request, then briefly for batch-mates
            jobs.append(self._queue.get())
            deadline = time.monotonic() + self.batch_window_s
            while len(jobs) < room and (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
        while len(jobs) < room:  # busy: take only what is already waiting, the running groups must not stall
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        jobs = [job for job in jobs if not self._ended(job)]
        if jobs:
            self._prefill(jobs)

    def _prefill(self, jobs: list[Job]) -> None:
        longest = max(len(job.input_ids) for job in jobs)
        ids = torch.full((len(jobs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(jobs):  # left padding
            ids[row, longest - len(job.input_ids) :] = job.input_ids
            mask[row, longest - len(job.input_ids) :] = 1
        pixels = [job.pixel_values for job in jobs if job.pixel_values is not None]
        try:
            decoder = StepDecoder(self.model, ids, mask, torch.cat(pixels) if pixels else None)
        except Exception as error:
            if len(jobs) > 1:  # find the request at fault: each alone, the others run as if it had never come
                for job in jobs:
                    self._prefill([job])
            else:
                self._finish(jobs[0], error=error)
            return
        self.stats["batches_run"] += 1
        group = _Group(jobs, decoder)
        self._groups.append(group)
        self._choose(group)

    def _advance(self, group: _Group) -> None:
        try:
            group.decoder.step([job.tokens[-1] for job in group.jobs])
        except Exception as error:  # not a request's fault (inputs were checked at prefill): every row fails
            for job in group.jobs:
                self._finish(job, error=error)
            self._groups.remove(group)
            return
        self.stats["steps_run"] += 1
        self._choose(group)

    def _choose(self, group: _Group) -> None:
        """Each row picks its next token from the group's logits; rows that are done leave the group."""
        logits = group.decoder.logits.float().cpu()
        keep = []
        for row, job in enumerate(group.jobs):
            if self._ended(job):
                continue
            token = job.chooser(logits[row])
            if token in self.eos_ids:
                self._finish(job, "stop")
                continue
            if job.top_logprobs is not None:
                job.logprobs.append(self._logprobs(logits[row], token, job.top_logprobs))
            job.tokens.append(token)
            if self._update_text(job):
                self._finish(job, "stop")
            elif len(job.tokens) >= job.max_tokens:
                self._finish(job, "length")
            else:
                keep.append(row)
        if not keep:
            self._groups.remove(group)
        elif len(keep) < len(group.jobs):
            group.decoder.keep(keep)
            group.jobs = [group.jobs[row] for row in keep]

    def _ended(self, job: Job) -> bool:
        """Drop a job whose client has gone or whose deadline has passed."""
        if job.cancelled:
            self.stats["cancelled"] += 1
            self._finish(job, "cancelled")
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            self.stats["timed_out"] += 1
            self._finish(job, error=JobTimeout(f"the request ran past its deadline after {len(job.tokens)} tokens"))
            return True
        return False

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> dict:
        logprob, alternatives = token_logprobs(logits, token, top)

        def entry(token_id: int, value: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        return {**entry(token, logprob), "top_logprobs": [entry(i, v) for i, v in alternatives]}

    def _update_text(self, job: Job) -> bool:
        """Decode the answer so far, stream what is safe to send; True once it holds a stop string."""
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        hits = [text.index(marker) for marker in job.stop if marker in text]
        if hits:
            job.text = text[: min(hits)]
            return True
        job.text = text
        safe = text
        if safe.endswith("\ufffd"):  # hold back a half multi-byte character
            safe = safe.rstrip("\ufffd")
        for marker in job.stop:  # hold back what may be the start of a stop string
            for size in range(min(len(marker) - 1, len(safe)), 0, -1):
                if safe.endswith(marker[:size]):
                    safe = safe[:-size]
                    break
        self._emit(job, safe)
        return False

    def _emit(self, job: Job, text: str) -> None:
        if len(text) > len(job.emitted) and job.on_token is not None:
            job.on_token(text[len(job.emitted) :])
        job.emitted = max(job.emitted, text, key=len)

    def _finish(self, job: Job, reason: str | None = None, error: Exception | None = None) -> None:
        job.finish_reason, job.error = reason, error
        if error is None:
            self._emit(job, job.text)
        if reason in ("stop", "length"):
            self.stats["finished"] += 1
        elif error is not None and not isinstance(error, JobTimeout):
            self.stats["failed"] += 1
        if job.on_token is not None:
            job.on_token(None)  # end of stream
        if job.on_done is not None:
            job.on_done()
