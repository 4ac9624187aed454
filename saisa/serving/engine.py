"""A generation engine shared by concurrent requests, with iteration-level scheduling: one worker thread owns the
model and, at every step, admits the requests that have arrived as a new group (one left-padded prefill), then
advances every running group by one token (`saisa.inference.decoding.StepDecoder`). A row leaves its group the moment
it is done (end of sequence, a stop string, its own `max_tokens`, its deadline, or its client gone), so a short request
never waits for a long one it shares a group with or arrived after.

Each request chooses its own tokens (`saisa.inference.sampling.Sampler`: temperature, top-p, its own seeded
generator) and ends by the rule `generate` ends by (`saisa.inference.stopping`), so requests with different
settings share a group and a seeded request draws the same tokens batched or alone. A group whose prefill fails is
retried one request at a time: one request's bad input fails that request only.

Prefill is bounded per step (`prefill_chunk_tokens` positions, visual tokens counted): short prompts share a group
within it, a longer prompt is prefilled alone a chunk per step, so running streams get a token between chunks
instead of waiting for every arriving prompt's whole prefill. The worker is supervised: a failing row (NaN logits)
fails its request, a failing step fails the requests it held, and `health()` reports a dead or stuck worker."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from saisa.inference.decoding import StepDecoder, token_logprobs
from saisa.inference.sampling import Sampler
from saisa.inference.stopping import stop_at, stop_token_ids, streamable
from saisa.serving.tokens import TokenBytes

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine holds as many waiting requests as it accepts."""


class JobTimeout(Exception):
    """A request ran past its deadline (queued and generating together)."""


class EngineDead(Exception):
    """The engine's worker thread has stopped: no request can be served."""


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
        self.sampler = Sampler(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def cancel(self) -> None:
        self.cancelled = True


class _Group:
    """Jobs prefilled together; rows of `decoder` in the order of `jobs`."""

    def __init__(self, jobs: list[Job], decoder: StepDecoder):
        self.jobs, self.decoder = jobs, decoder


class _Chunked:
    """A prompt longer than one step's prefill budget, prefilled alone a chunk per engine step."""

    def __init__(self, job: Job, chunks: list[tuple[torch.Tensor, torch.Tensor | None]]):
        self.job, self.chunks = job, chunks  # chunks: (ids (1, t), that chunk's images (n, 3, S, S) or None)
        self.decoder: StepDecoder | None = None


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
        prefill_chunk_tokens: int = 512,
        stuck_after_s: float = 120.0,
    ):
        """max_batch_size: requests prefilled together as one group; max_running: requests decoding at once (default
        2 x max_batch_size); max_queue: requests waiting beyond those (`submit` raises QueueFull past it);
        batch_window_s: how long an idle engine waits for batch-mates of a first request; prefill_chunk_tokens:
        prompt positions prefilled per engine step; stuck_after_s: one step running longer than this makes `health()`
        report the engine stuck."""
        self.model, self.tokenizer = model, processor.tokenizer
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_running = max_running or 2 * max_batch_size
        self.prefill_chunk_tokens, self.stuck_after_s = prefill_chunk_tokens, stuck_after_s
        self.image_token_id, self.tokens_per_image = model.config.image_token_id, model.tokens_per_image
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.eos_ids = set(stop_token_ids(model, self.tokenizer))
        self.token_bytes = TokenBytes(self.tokenizer)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._held: collections.deque[Job] = collections.deque()  # taken from the queue, not fitting this step
        self._groups: list[_Group] = []
        self._chunked: _Chunked | None = None
        self._in_hand: list[Job] = []  # taken for this step's prefill, in no group yet
        self._step_started: float | None = None  # when the worker began its current step; None while idle
        self.fatal: BaseException | None = None  # what stopped the worker, if anything did
        # groups prefilled, steps run, and how requests ended (counted in /health)
        self.stats = {
            "batches_run": 0,
            "steps_run": 0,
            "prefill_chunks_run": 0,
            "finished": 0,
            "cancelled": 0,
            "timed_out": 0,
            "failed": 0,
            "step_failures": 0,
        }
        self._worker = threading.Thread(target=self._run, name="saisa-engine", daemon=True)
        self._worker.start()

    def load(self) -> dict:
        """Requests waiting and decoding now."""
        running = sum(len(g.jobs) for g in self._groups) + (self._chunked is not None)
        return {"waiting": self._queue.qsize() + len(self._held), "running": running}

    def health(self) -> str | None:
        """None while the worker is alive and not stuck in one step; else why it is not healthy."""
        if not self._worker.is_alive():
            return f"the engine thread has stopped ({type(self.fatal).__name__}: {self.fatal})"
        started = self._step_started
        if started is not None and (busy := time.monotonic() - started) > self.stuck_after_s:
            return f"the engine has been in one step for {busy:.0f} s (limit {self.stuck_after_s:g} s): stuck"
        return None

    def submit(self, job: Job) -> Job:
        if not self._worker.is_alive():
            raise EngineDead(self.health())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job

    # -- the worker ----------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    self._admit()
                    for group in list(self._groups):
                        self._advance(group)
                except Exception as error:  # a fault of the engine itself: fail the requests it holds, go on
                    logger.exception("engine step failed; failing the %d requests it held", self.load()["running"])
                    self.stats["step_failures"] += 1
                    self._fail_running(error)
                finally:
                    self._step_started = None
        except BaseException as error:  # the worker stops: nobody would answer what it holds or what waits
            self.fatal = error
            self._fail_running(error)
            while (job := self._next_job()) is not None:
                self._finish(job, error=error)
            raise

    def _fail_running(self, error: BaseException) -> None:
        jobs = [job for group in self._groups for job in group.jobs] + self._in_hand
        if self._chunked is not None:
            jobs.append(self._chunked.job)
        self._groups, self._chunked, self._in_hand = [], None, []
        for job in jobs:
            if job.finish_reason is None and job.error is None:
                self._finish(job, error=error)

    def _next_job(self, *, block: bool = False, timeout: float | None = None) -> Job | None:
        if self._held:
            return self._held.popleft()
        try:
            job = self._queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return None
        return job

    def _positions(self, job: Job) -> int:
        images = int((job.input_ids == self.image_token_id).sum())
        return len(job.input_ids) + images * (self.tokens_per_image - 1)

    def _admit(self) -> None:
        """One step's prefill: the next chunk of a long prompt, or the waiting requests (up to max_batch_size, within
        max_running and the step's prefill budget) as one new group."""
        if self._chunked is not None:
            self._step_started = time.monotonic()
            self._prefill_chunk()
            return
        room = min(self.max_batch_size, self.max_running - sum(len(g.jobs) for g in self._groups))
        if room <= 0:
            return
        # idle: wait for a request, then briefly for batch-mates; busy: take only what is already waiting, the
        # running groups must not stall
        first = self._next_job(block=not self._groups)
        if first is None:
            return
        self._step_started = time.monotonic()
        if self._ended(first):
            return
        if self._positions(first) > self.prefill_chunk_tokens:
            self._chunked = _Chunked(first, self._chunks(first))
            self._prefill_chunk()
            return
        jobs, longest = [first], self._positions(first)
        deadline = time.monotonic() + (0 if self._groups else self.batch_window_s)
        while len(jobs) < room:
            left = deadline - time.monotonic()
            job = self._next_job(block=True, timeout=left) if left > 0 else self._next_job()
            if job is None:
                break
            if self._ended(job):
                continue
            size = max(longest, self._positions(job))
            if size * (len(jobs) + 1) > self.prefill_chunk_tokens:  # padded to the longest: rows x longest
                self._held.appendleft(job)  # first in line for the next step
                break
            jobs.append(job)
            longest = size
        self._in_hand = jobs
        self._prefill(jobs)
        self._in_hand = []

    def _chunks(self, job: Job) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The prompt cut into pieces of at most prefill_chunk_tokens positions (an image's v positions stay
        together), each with its images."""
        chunks, start, size, image = [], 0, 0, 0
        ids = job.input_ids
        for i, token in enumerate(ids.tolist()):
            width = self.tokens_per_image if token == self.image_token_id else 1
            if size and size + width > self.prefill_chunk_tokens:
                chunks.append((start, i))
                start, size = i, 0
            size += width
        chunks.append((start, len(ids)))
        pieces = []
        for begin, end in chunks:
            piece = ids[begin:end]
            count = int((piece == self.image_token_id).sum())
            pixels = job.pixel_values[image : image + count] if count else None
            image += count
            pieces.append((piece[None], pixels))
        return pieces

    def _prefill_chunk(self) -> None:
        chunked = self._chunked
        if self._ended(chunked.job):
            self._chunked = None
            return
        ids, pixels = chunked.chunks.pop(0)
        try:
            if chunked.decoder is None:
                chunked.decoder = StepDecoder(self.model, ids, torch.ones_like(ids), pixels)
            else:
                chunked.decoder.extend(ids, pixels)
        except Exception as error:
            self._chunked = None
            self._finish(chunked.job, error=error)
            return
        self.stats["prefill_chunks_run"] += 1
        if not chunked.chunks:
            self._chunked = None
            self.stats["batches_run"] += 1
            group = _Group([chunked.job], chunked.decoder)
            self._groups.append(group)
            self._choose(group)

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
        self.stats["prefill_chunks_run"] += 1
        group = _Group(jobs, decoder)
        self._groups.append(group)
        self._choose(group)

    def _advance(self, group: _Group) -> None:
        self._step_started = self._step_started or time.monotonic()
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
        """Each row picks its next token from the group's logits; rows that are done leave the group. A row whose
        choice fails (non-finite logits) fails its own request only."""
        logits = group.decoder.logits.float().cpu()
        keep = []
        for row, job in enumerate(group.jobs):
            if self._ended(job):
                continue
            try:
                token = job.sampler(logits[row])
                if token in self.eos_ids:
                    self._finish(job, "stop")
                    continue
                if job.top_logprobs is not None:
                    job.logprobs.append(self._logprobs(logits[row], token, job.top_logprobs))
                job.tokens.append(token)
                done = "stop" if self._update_text(job) else "length" if len(job.tokens) >= job.max_tokens else None
            except Exception as error:
                logger.warning("request failed at token %d: %s", len(job.tokens), error)
                self._finish(job, error=error)
                continue
            if done:
                self._finish(job, done)
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
            return {"token": text, "logprob": value, "bytes": self.token_bytes(token_id)}

        return {**entry(token, logprob), "top_logprobs": [entry(i, v) for i, v in alternatives]}

    def _update_text(self, job: Job) -> bool:
        """Decode the answer so far, stream what is safe to send; True once it holds a stop string."""
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        at = stop_at(text, job.stop)
        if at is not None:
            job.text = text[:at]
            return True
        job.text = text
        self._emit(job, streamable(text, job.stop))
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
        for callback, argument in ((job.on_token, (None,)), (job.on_done, ())):  # None: the end of the stream
            if callback is not None:
                try:
                    callback(*argument)
                except RuntimeError:  # the server's event loop has closed (shutting down): nobody to tell
                    pass
