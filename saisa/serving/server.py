"""An OpenAI-compatible HTTP server (FastAPI): `/v1/chat/completions` (streaming SSE and not), `/v1/models`,
`/health`. Concurrent requests share one `GenerationEngine`, which batches them."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from saisa.serving.engine import GenerationEngine, Job, Sampling
from saisa.serving.protocol import ChatCompletionRequest, RequestError, ServerLimits, to_prompt


def create_app(
    model,
    processor,
    *,
    model_name: str = "saisa",
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
) -> FastAPI:
    limits = limits or ServerLimits()
    engine = GenerationEngine(model, processor, max_batch_size=max_batch_size)
    # The engine thread tokenises batches with padding; a fast tokenizer keeps its padding settings in shared state,
    # so requests count their tokens with a copy of their own.
    counting_tokenizer = copy.deepcopy(processor.tokenizer)
    max_positions = limits.max_prompt_positions or getattr(model.config.text_config, "max_position_embeddings", None)
    app = FastAPI(title="saisa", description="OpenAI-compatible chat completions for SAISA models")
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(RequestError(401, "missing or wrong API key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        cache = model.image_kv_cache
        return {
            "status": "ok",
            "model": model_name,
            "batches_run": engine.batches_run,
            "image_kv_cache": cache.stats() if cache is not None else None,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "saisa"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = _parse(await request.body())
        if chat.model != model_name:
            raise RequestError(
                404,
                f"model {chat.model!r} not found; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        max_tokens = chat.max_completion_tokens or chat.max_tokens or min(256, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise RequestError(
                400, f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}", param="max_tokens"
            )
        prompt, images = to_prompt(chat, processor, limits)
        positions = len(counting_tokenizer(prompt, add_special_tokens=False)["input_ids"]) + len(images) * (
            model.tokens_per_image - 1
        )
        if max_positions and positions + max_tokens > max_positions:
            raise RequestError(
                400,
                f"prompt too long: {positions} positions + {max_tokens} new tokens exceed the model's {max_positions}",
                param="messages",
                code="context_length_exceeded",
            )
        sampling = Sampling(temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)
        job = Job(prompt=prompt, images=images, max_tokens=max_tokens, sampling=sampling)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if chat.stream:
            return StreamingResponse(_stream(engine, job, ident, created, model_name), media_type="text/event-stream")
        await asyncio.to_thread(_run, engine, job)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": job.text}, "finish_reason": job.finish_reason}
            ],
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": len(job.tokens),
                "total_tokens": job.prompt_tokens + len(job.tokens),
            },
        }

    return app


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"request body is not valid JSON: {error}") from None
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestError(400, f"invalid request: {where}: {first['msg']}", param=where or None) from None


def _run(engine: GenerationEngine, job: Job) -> None:
    try:
        engine.generate(job)
    except ValueError as error:  # the model refused the input (e.g. image count, length): the client's problem
        raise RequestError(400, str(error)) from None
    except Exception as error:  # never a stack trace to the client
        raise RequestError(500, f"generation failed: {type(error).__name__}") from None


async def _stream(engine: GenerationEngine, job: Job, ident: str, created: int, model_name: str):
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job.on_token = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)
    engine.submit(job)

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while (delta := await deltas.get()) is not None:
        yield chunk({"content": delta})
    if job.error is not None:
        message = str(job.error) if isinstance(job.error, ValueError) else type(job.error).__name__
        yield f"data: {json.dumps(RequestError(400, message).body())}\n\n"
    else:
        yield chunk({}, job.finish_reason)
    yield "data: [DONE]\n\n"
