"""An OpenAI-compatible HTTP server (FastAPI): `/v1/chat/completions` (streaming SSE and not), `/v1/models`,
`/health`. Concurrent requests share one `GenerationEngine`, which schedules them a token at a time.

The event loop only moves bytes: parsing, image decoding, the chat template and tokenisation run in worker threads,
generation in the engine's thread, so `/health` answers while the largest accepted request is being prepared. Every
bound is checked before the work it bounds: bytes buffered across requests while bodies arrive, characters before
tokenising, pixels (from image headers) per request and across requests before decoding, the request's deadline
at each stage of its preparation."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from saisa.inference.sampling import NonFiniteLogits
from saisa.processing.views import NUM_FRAMES, anyres_grid_pinpoints, frame_indices, repeat_placeholders
from saisa.serving.engine import EngineDead, GenerationEngine, Job, JobTimeout, QueueFull
from saisa.serving.protocol import (
    ChatCompletionRequest,
    MediaPart,
    RequestError,
    ServerLimits,
    check_request,
    image_size,
    image_source,
    lazy_image,
    read_image,
    to_messages,
)
from saisa.serving.tokens import PromptTokenizer

POLL_S = 0.25  # how often a waiting request checks for its client having gone and for its deadline
PREPARE_THREADS = 4  # requests decoded and tokenised at once (each may hold max_images decoded images)


def _lower_priority() -> None:
    """Preparing threads yield the CPU to the event loop and the engine (Linux: a thread's own nice value)."""
    if hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def create_app(
    model,
    processor,
    *,
    model_name: str = "saisa",
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
    max_tiles: int | None = None,
    visual_pruning: dict | None = None,
) -> FastAPI:
    """api_key: when set, every route needs `Authorization: Bearer KEY` (the docs and the OpenAPI schema too), except
    `/health`, left open for probes: it reports health and load counters, nothing of any request's content.
    max_tiles: tile images AnyRes-style on every grid of 2 to max_tiles encoder-sized tiles
    (`saisa.processing.views.anyres_grid_pinpoints`), replacing `processor`'s own `image_grid_pinpoints`.
    visual_pruning: `saisa.model.pruning.VisualPruning`'s fields (`{"keep_ratio": 0.25}`), replacing the model's own
    `config.visual_pruning`; checked against the model before anything is served."""
    limits = limits or ServerLimits()
    if visual_pruning is not None:
        model.config.set_visual_pruning(visual_pruning)
    if max_tiles is not None:
        processor.image_grid_pinpoints = anyres_grid_pinpoints(processor.preprocessing.image_size, max_tiles)
    engine = GenerationEngine(
        model,
        processor,
        max_batch_size=max_batch_size,
        max_queue=limits.max_queue,
        prefill_chunk_tokens=limits.prefill_chunk_tokens,
        stuck_after_s=limits.stuck_after_s,
    )
    prepare = _Preparer(model, processor, limits, model_name)
    preparing = ThreadPoolExecutor(PREPARE_THREADS, "saisa-prepare", initializer=_lower_priority)
    buffered = _ByteBudget(limits.max_inflight_body_bytes)
    app = FastAPI(title="saisa", description="OpenAI-compatible chat completions for SAISA models")
    app.state.engine, app.state.preparer = engine, prepare

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):  # the router's 404 and 405, in OpenAI's shape
        body = RequestError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception):  # a JSON 500 naming the exception type, never a stack trace
        return JSONResponse(RequestError(500, f"internal error: {type(error).__name__}").body(), status_code=500)

    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.get("/health")
    async def health():
        reason = engine.health()
        status = {"status": "ok"} if reason is None else {"status": "unhealthy", "reason": reason}
        cache = model.image_kv_cache
        status.update(  # counters only: nothing of any request's content
            model=model_name,
            **engine.load(),
            **engine.stats,
            buffered_body_bytes=buffered.used,
            image_kv_cache=cache.stats() if cache is not None else None,
        )
        return JSONResponse(status, status_code=200 if reason is None else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "saisa"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + limits.request_timeout_s
        loop = asyncio.get_running_loop()
        with buffered.hold() as reservation:  # the body and what is parsed from it, until the job is made
            body = await _read_body(request, limits, reservation)
            chat, job = await loop.run_in_executor(preparing, prepare, body, deadline)
            del body
        job.deadline = deadline
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        reply = _Reply(ident, created, model_name, chat, job)
        if chat.stream:
            deltas: asyncio.Queue = asyncio.Queue()
            job.on_token = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)
            _submit(engine, job)  # before the first byte: a full queue is still a plain 503
            return StreamingResponse(_stream(job, deltas, reply, limits), media_type="text/event-stream")
        finished = asyncio.Event()
        job.on_done = lambda: loop.call_soon_threadsafe(finished.set)
        _submit(engine, job)
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), POLL_S)
            except asyncio.TimeoutError:  # (builtin TimeoutError only from Python 3.11)
                if await request.is_disconnected():
                    job.cancel()  # nobody will read the answer: stop computing it
                    return Response(status_code=499)
                if time.monotonic() > deadline:
                    job.cancel()
                    raise _timeout(limits) from None
        if job.error is not None:
            raise _error_of(job.error, limits)
        return reply.completion()

    return app


class _RequireKey:
    """`Authorization: Bearer KEY` on every route but `/health`. A plain ASGI middleware: starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the route, which then could not stop generating."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # no timing oracle on the key
                response = JSONResponse(RequestError(401, "missing or wrong API key").body(), status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _ByteBudget:
    """Request-body bytes buffered at once, across requests (the event loop's own: no lock). A request that would
    pass the budget gets 503 + Retry-After before more of its body is read. Bytes count once they arrive, not as
    Content-Length announces them: else a few connections announcing large bodies and sending nothing would hold
    the whole budget, and every other request would get 503 until their body timeout."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def hold(self):
        reservation = _Reservation(self)
        try:
            yield reservation
        finally:
            self.used -= reservation.size


class _Reservation:
    def __init__(self, budget: _ByteBudget):
        self.budget, self.size = budget, 0

    def grow(self, size: int) -> None:
        """Hold `size` bytes in all for this request."""
        budget = self.budget
        if size <= self.size:
            return
        if budget.used + size - self.size > budget.limit:
            raise RequestError(
                503,
                f"server busy: {budget.used} bytes of request bodies are buffered and this server's limit is "
                f"{budget.limit}; retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        budget.used += size - self.size
        self.size = size


class _PixelBudget:
    """Decoded image pixels across the preparing threads; a request waits (until its deadline) for room."""

    def __init__(self, limit: int):
        self.limit, self.used, self.changed = limit, 0, threading.Condition()

    def acquire(self, pixels: int, deadline: float) -> None:
        with self.changed:
            while self.used and self.used + pixels > self.limit:
                if not self.changed.wait(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise RequestError(
                        504, "the request timed out waiting for other requests' images to be decoded", code="timeout"
                    )
            self.used += pixels

    def release(self, pixels: int) -> None:
        with self.changed:
            self.used -= pixels
            self.changed.notify_all()


class _Preparer:
    """A request body -> (request, engine job): parse, validate, bound, render the template, tokenise, read image
    headers, decode images, each limit checked before the work it bounds and the deadline between stages. Runs in
    worker threads, several at once, with no lock between them."""

    def __init__(self, model, processor, limits: ServerLimits, model_name: str):
        self.processor, self.limits, self.model_name = processor, limits, model_name
        self.tokens_per_image = model.tokens_per_image
        self.max_positions = limits.max_prompt_positions or getattr(
            model.config.text_config, "max_position_embeddings", None
        )
        self.tokenizer = PromptTokenizer(processor)
        # No token spells more characters than the vocabulary's longest, so a longer text cannot fit the context.
        self.max_chars = limits.max_prompt_chars or (
            self.max_positions * self.tokenizer.longest_token if self.max_positions else None
        )
        self.pixels = _PixelBudget(limits.max_inflight_pixels)

    def __call__(self, body: bytes, deadline: float) -> tuple[ChatCompletionRequest, Job]:
        _check_deadline(deadline, self.limits)  # it may have waited for a preparing thread
        try:
            payload = json.loads(body)
        except ValueError as error:  # also UTF-8 errors, and integers past Python's int_max_str_digits
            raise RequestError(400, f"request body is not valid JSON: {error}") from None
        except RecursionError:
            raise RequestError(400, "request body is nested too deeply") from None
        chat = check_request(payload)
        if chat.model != self.model_name:
            raise RequestError(
                404,
                f"model {chat.model!r} not found; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        limits = self.limits
        max_tokens = chat.max_completion_tokens or chat.max_tokens or min(256, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise RequestError(
                400, f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}", param="max_tokens"
            )
        messages, texts, media = to_messages(chat, self.processor, limits)
        chars = sum(len(text) for text in texts)
        if self.max_chars and chars > self.max_chars:
            raise RequestError(
                400,
                f"prompt too long: {chars} characters cannot fit the model's {self.max_positions} positions "
                f"(this server refuses more than {self.max_chars} characters before tokenising)",
                param="messages",
                code="context_length_exceeded",
            )
        _check_deadline(deadline, self.limits)
        ids, kinds = self.tokenizer.encode(messages, texts)
        media = self._in_prompt_order(media, kinds)
        _check_deadline(deadline, self.limits)
        # every image and frame: its bytes checked and its header read, nothing decoded
        sources = [[(image_source(url, limits, where), where) for url, where in _frames(part)] for part in media]
        sizes = [[image_size(source, limits, where) for source, where in item] for item in sources]
        views = [self._views(part, item) for part, item in zip(media, sizes, strict=True)]
        if sum(views) > limits.max_views:
            raise RequestError(
                400,
                f"the request's images and videos make {sum(views)} views (an image's base view and tiles, a "
                f"video's kept frames), more than this server's limit of {limits.max_views}",
                param="messages",
                code="too_many_views",
            )
        (ids,) = repeat_placeholders(ids, self.processor.image_token_id, views)
        positions = len(ids) + sum(views) * (self.tokens_per_image - 1)  # each view takes v positions
        if self.max_positions and positions + max_tokens > self.max_positions:
            raise RequestError(
                400,
                f"prompt too long: {positions} positions + {max_tokens} new tokens exceed the model's "
                f"{self.max_positions}",
                param="messages",
                code="context_length_exceeded",
            )
        # pixels decoded: an image's, a video's kept frames' (bounded by its largest frame's)
        pixels = sum(
            max(w * h for w, h in item) * (count if part.kind == "video" else 1)
            for part, item, count in zip(media, sizes, views, strict=True)
        )
        if pixels > limits.max_request_pixels:
            raise RequestError(
                400,
                f"the request's images hold {pixels} pixels in all, more than this server's limit of "
                f"{limits.max_request_pixels}",
                param="messages",
                code="image_too_large",
            )
        _check_deadline(deadline, self.limits)
        pixel_values = None
        if media:
            self.pixels.acquire(pixels, deadline)
            try:
                decoded = []
                for part, item, count in zip(media, sources, views, strict=True):
                    _check_deadline(deadline, self.limits)
                    decoded += self._decode(part, item, count)
                pixel_values = self.processor.preprocess_images(decoded)
                del decoded
            finally:
                self.pixels.release(pixels)
        job = Job(
            input_ids=torch.tensor(ids, dtype=torch.long),
            pixel_values=pixel_values,
            max_tokens=max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            stop=chat.stop_strings(),
            top_logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
            prompt_tokens=positions,
        )
        return chat, job

    def _in_prompt_order(self, media: list[MediaPart], kinds: list[str]) -> list[MediaPart]:
        """The images and videos in the order the template rendered their placeholders (each kind in its own order,
        as `SaisaProcessor` pairs them)."""
        queues = {kind: iter([part for part in media if part.kind == kind]) for kind in ("image", "video")}
        for kind in ("image", "video"):
            given, rendered = sum(part.kind == kind for part in media), kinds.count(kind)
            if given != rendered:
                raise RequestError(
                    400,
                    f"this model's chat template rendered {rendered} {kind} placeholder(s) for the request's {given} "
                    f"{kind}(s)",
                    param="messages",
                    code="unsupported_content",
                )
        return [next(queues[kind]) for kind in kinds]

    def _views(self, part: MediaPart, sizes: list[tuple[int, int]]) -> int:
        """How many encoder inputs an image (its base view and tiles) or a video (its kept frames) becomes."""
        if part.kind == "image":
            return self.processor.num_views(sizes[0])
        return len(frame_indices(len(sizes), NUM_FRAMES))

    def _decode(self, part: MediaPart, sources: list[tuple[bytes | Path, str]], count: int) -> list:
        """The views of one image or video, decoded (a video's skipped frames never are)."""
        if part.kind == "image":
            ((source, where),) = sources
            views = self.processor.views(read_image(source, self.limits, where))
        else:
            try:
                views = self.processor.views([lazy_image(source) for source, _ in sources], "video", NUM_FRAMES)
            except (OSError, SyntaxError, EOFError, ValueError) as error:  # PIL's decoders raise these on broken files
                raise RequestError(
                    400, f"{part.where}: cannot decode a frame: {error}", param=part.where, code="invalid_image"
                ) from None
        if len(views) != count:
            raise RuntimeError(f"{part.where}: {len(views)} views where {count} were counted from the headers")
        return views


def _frames(part: MediaPart) -> list[tuple[str, str]]:
    """(url, where) of an image's one URL or of each of a video's frames."""
    if part.kind == "image":
        return [(part.urls[0], part.where)]
    return [(url, f"{part.where}.video[{f}]") for f, url in enumerate(part.urls)]


def _check_deadline(deadline: float, limits: ServerLimits) -> None:
    if time.monotonic() > deadline:
        raise _timeout(limits)


class _Reply:
    """The OpenAI JSON of one request's answer."""

    def __init__(self, ident: str, created: int, model_name: str, chat: ChatCompletionRequest, job: Job):
        self.ident, self.created, self.model_name, self.chat, self.job = ident, created, model_name, chat, job

    def usage(self) -> dict:
        prompt, completion = self.job.prompt_tokens, len(self.job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.job.text},
            "logprobs": {"content": self.job.logprobs} if self.chat.logprobs else None,
            "finish_reason": self.job.finish_reason,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if self.chat.logprobs:
            choice["logprobs"] = {"content": logprobs or []}
        body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk has the field, only the last one fills it
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self) -> str:
        return f"data: {json.dumps({**self._head('chat.completion.chunk'), 'choices': [], 'usage': self.usage()})}\n\n"

    @property
    def include_usage(self) -> bool:
        return self.chat.stream_options is not None and self.chat.stream_options.include_usage

    def _head(self, kind: str) -> dict:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model_name}


async def _read_body(request: Request, limits: ServerLimits, reservation: _Reservation) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit (from Content-Length, else while it
    arrives), with 503 when buffering it would pass the bytes held across requests, with 408 when it has not all
    arrived within body_timeout_s."""
    limit = limits.max_body_bytes
    too_large = RequestError(413, f"request body larger than this server's limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    arrived_by = time.monotonic() + limits.body_timeout_s
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, arrived_by - time.monotonic()))
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # nobody to answer; not a fault to log with a traceback (a client could flood the log)
            raise RequestError(400, "the client closed the connection before its body arrived") from None
        except asyncio.TimeoutError:  # (builtin TimeoutError only from Python 3.11)
            raise RequestError(
                408, f"the request body did not arrive within {limits.body_timeout_s:g} s", code="timeout"
            ) from None
        size += len(chunk)
        if size > limit:
            raise too_large
        reservation.grow(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _submit(engine: GenerationEngine, job: Job) -> None:
    try:
        engine.submit(job)
    except QueueFull as error:
        raise RequestError(
            503, f"server busy: {error}; retry shortly", code="overloaded", headers={"Retry-After": "1"}
        ) from None
    except EngineDead as error:
        raise RequestError(503, f"server unavailable: {error}", code="engine_dead") from None


def _timeout(limits: ServerLimits) -> RequestError:
    return RequestError(504, f"the request took longer than {limits.request_timeout_s:g} s", code="timeout")


def _error_of(error: Exception, limits: ServerLimits) -> RequestError:
    if isinstance(error, JobTimeout):
        return _timeout(limits)
    if isinstance(error, ValueError):  # the model refused this request's input: the client's problem
        return RequestError(400, str(error))
    if isinstance(error, NonFiniteLogits):
        return RequestError(500, f"generation failed: {error}", code="non_finite_logits")
    return RequestError(500, f"generation failed: {type(error).__name__}")  # never a stack trace to the client


async def _stream(job: Job, deltas: asyncio.Queue, reply: _Reply, limits: ServerLimits):
    """Server-sent events of `job`'s text deltas (with their logprobs), its finish and, if asked, its usage."""
    sent = 0  # logprobs entries sent so far

    def new_logprobs() -> list:
        nonlocal sent
        fresh = job.logprobs[sent:]
        sent += len(fresh)
        return fresh

    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        error = None
        while True:
            try:
                delta = await asyncio.wait_for(deltas.get(), POLL_S)
            except asyncio.TimeoutError:  # (builtin TimeoutError only from Python 3.11)
                if time.monotonic() > job.deadline:
                    error = JobTimeout()
                    break
                continue
            if delta is None:
                error = job.error
                break
            yield reply.chunk({"content": delta}, logprobs=new_logprobs())
        if error is not None:
            yield f"data: {json.dumps(_error_of(error, limits).body())}\n\n"
        else:
            yield reply.chunk({}, job.finish_reason, logprobs=new_logprobs())
            if reply.include_usage:
                yield reply.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once the job is done; otherwise the client has gone or timed out: stop generating
