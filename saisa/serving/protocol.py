"""OpenAI chat-completions requests: validation and conversion to a prompt plus images, with errors that name the
problem (`RequestError` carries the HTTP status)."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from saisa.processing import ImageRefused, open_image


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            503: "overloaded_error",
            504: "timeout_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # An unknown field is a 400 that names it (OpenAI does the same), never silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # a torch generator's seed is 64 bits, unsigned
    n: int = Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None  # an end-user id for the caller's own records; it changes no answer

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# OpenAI parameters this server does not implement, with the value that means "not used": anything else is a 400
# naming the parameter rather than a 200 that quietly ignores it.
UNSUPPORTED = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "response_format": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
    "reasoning_effort": None,
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_strings(payload: Any) -> None:
    """Every string in the body must be valid Unicode: JSON's \\ud800 escape gives a lone surrogate, which no
    tokenizer or UTF-8 encoder takes."""
    stack = [(payload, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if surrogate := _SURROGATE.search(value):  # (a search, not an encode: no copy of a large text)
                raise RequestError(
                    400,
                    f"invalid request: {where or 'body'}: the text holds a lone UTF-16 surrogate "
                    f"({surrogate.group()!r} at character {surrogate.start()}), not valid Unicode",
                    param=where or None,
                )
        elif isinstance(value, dict):
            stack += [(item, f"{where}.{key}".lstrip(".")) for key, item in value.items()]
            stack += [(key, where or "body") for key in value]
        elif isinstance(value, list):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(value)]


def check_request(payload: Any) -> ChatCompletionRequest:
    """A parsed JSON body -> a validated request, or a 400 naming the field at fault."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _check_strings(payload)
    for name, unused in UNSUPPORTED.items():
        if payload.get(name, unused) not in (unused, None):
            raise RequestError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    try:
        chat = ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RequestError(400, f"invalid request: {where}: {first['msg']}", param=where or None) from None
    if len(chat.stop_strings()) > 4 or not all(chat.stop_strings()):
        raise RequestError(400, "stop takes at most 4 non-empty strings", param="stop")
    if chat.top_logprobs is not None and not chat.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if chat.stream_options is not None and not chat.stream:
        raise RequestError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return chat


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask; each is checked before the work it bounds (docs/serving.md lists them)."""

    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_images: int = 8  # image_url and video parts per request
    max_video_frames: int = 64  # frames one video part may list (the processor keeps `num_frames` of them)
    max_views: int = 64  # encoder inputs per request: each image's views (base + tiles) and each video's kept frames
    max_image_pixels: int = 4096 * 4096  # from the image header, before decoding
    max_request_pixels: int = 2 * 4096 * 4096  # all of a request's images, from their headers
    max_inflight_pixels: int = 4 * 4096 * 4096  # decoded at once across requests; more wait for their turn
    max_prompt_chars: int | None = None  # default: the context length x the vocabulary's longest token
    max_aspect_ratio: float = 20.0  # longest side over shortest side
    max_prompt_positions: int | None = None  # default: the LLM's maximum
    max_tokens: int = 512
    max_queue: int = 64  # requests waiting for the engine; more get 503 + Retry-After
    request_timeout_s: float = 300.0
    max_inflight_body_bytes: int = 64 * 2**20  # request bodies buffered at once; more get 503 + Retry-After
    body_timeout_s: float = 30.0  # the whole body must arrive within this (408 past it)
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this (closed past it)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open connections; more are closed at once
    prefill_chunk_tokens: int = 512  # prompt positions prefilled per engine step (longer prompts: chunks)
    stuck_after_s: float = 120.0  # one engine step running longer makes /health report 503
    allowed_image_dir: Path | None = None  # local files readable only under here, and only when set


def image_source(url: str, limits: ServerLimits, where: str) -> bytes | Path:
    """An image_url's encoded image (bytes of a data URL, or an allowed local file), its byte size checked."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(400, f"{where}: only base64 data URLs are supported", param=where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(
                400, f"{where}: image larger than {limits.max_image_bytes} bytes", param=where, code="image_too_large"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{where}: the data URL is not valid base64", param=where) from None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, f"{where}: remote image URLs are not fetched; send a base64 data URL", param=where)
    if limits.allowed_image_dir is None:
        raise RequestError(
            403, f"{where}: reading local files is disabled on this server", param=where, code="path_not_allowed"
        )
    if "\x00" in url:
        raise RequestError(400, f"{where}: the path holds a NUL byte", param=where)
    path = Path(url.removeprefix("file://"))
    resolved, root = path.resolve(), limits.allowed_image_dir.resolve()
    if not resolved.is_relative_to(root):
        raise RequestError(403, f"{where}: {path} is outside the allowed folder", param=where, code="path_not_allowed")
    if not resolved.is_file():
        raise RequestError(400, f"{where}: image file {path} not found", param=where)
    if resolved.stat().st_size > limits.max_image_bytes:
        raise RequestError(
            400, f"{where}: image larger than {limits.max_image_bytes} bytes", param=where, code="image_too_large"
        )
    return resolved


def read_image(source: bytes | Path, limits: ServerLimits, where: str, *, header_only: bool = False):
    """The decoded RGB image, or with header_only its (width, height); the per-image limits are checked from the
    header first."""
    try:
        return open_image(
            source,
            name=where,
            max_pixels=limits.max_image_pixels,
            max_aspect_ratio=limits.max_aspect_ratio,
            header_only=header_only,
        )
    except ValueError as error:
        code = "image_too_large" if isinstance(error, ImageRefused) else "invalid_image"
        raise RequestError(400, str(error), param=where, code=code) from None


def image_size(source: bytes | Path, limits: ServerLimits, where: str) -> tuple[int, int]:
    """(width, height) from the image's header (PIL's lazy open: no pixel is decoded); the per-image limits are
    checked there too."""
    return read_image(source, limits, where, header_only=True)


def lazy_image(source: bytes | Path) -> Image.Image:
    """An image whose header alone is read (already checked by `image_size`); its pixels are decoded when first
    used, so a video's frames that sampling skips are never decoded."""
    return Image.open(io.BytesIO(source if isinstance(source, bytes) else source.read_bytes()))


@dataclass(frozen=True)
class MediaPart:
    """An image_url part (`urls` holds its one URL) or a video part (its frames' URLs), `where` it is in the request."""

    kind: str  # "image" | "video"
    urls: tuple[str, ...]
    where: str


def _video_frames(part: dict, limits: ServerLimits, where: str) -> tuple[str, ...]:
    """A video part's frame URLs, their count checked before any is read."""
    frames = part.get("video")
    if not isinstance(frames, list):
        raise RequestError(
            400,
            f"{where}: a video part needs 'video': a list of frames, each an image URL (base64 data URLs); video "
            "files are not decoded",
            param=where,
            code="invalid_video",
        )
    if not frames:
        raise RequestError(400, f"{where}: the video has no frames", param=where, code="invalid_video")
    if len(frames) > limits.max_video_frames:
        raise RequestError(
            400,
            f"{where}: {len(frames)} frames exceed this server's limit of {limits.max_video_frames} per video",
            param=where,
            code="too_many_frames",
        )
    for f, frame in enumerate(frames):
        if not isinstance(frame, str):
            raise RequestError(
                400, f"{where}.video[{f}]: a frame must be an image URL string", param=where, code="invalid_video"
            )
    return tuple(frames)


def to_messages(
    request: ChatCompletionRequest, processor, limits: ServerLimits
) -> tuple[list[dict], list[str], list[MediaPart]]:
    """The messages for the model's chat template (image parts as `{"type": "image"}`, video parts as
    `{"type": "video"}`), every client text in order of appearance, and the images and videos in order of appearance,
    to read once the prompt is known to fit. Every text part, the image and video count and each video's frame count
    are checked here, before anything is tokenised or decoded."""
    messages, texts, media = [], [], []

    def text_of(value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise RequestError(400, f"{where}: a text part needs a string 'text'", param=where)
        texts.append(value)
        for token, kind in ((processor.image_token, "image"), (processor.video_token, "video")):
            if token in value:  # it would pair with another request's image or video, or with none
                parts = "image_url" if kind == "image" else "video"
                raise RequestError(
                    400,
                    f"{where}: the text holds {token!r}, this model's {kind} placeholder; send {kind}s as {parts} "
                    "parts",
                    param=where,
                    code="image_placeholder_in_text",
                )
        return value

    for m, message in enumerate(request.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": text_of(message.content, f"messages[{m}].content")})
            continue
        parts = []
        for p, part in enumerate(message.content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": text_of(part.get("text"), where)})
            elif kind == "image_url":
                url = part.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(400, f"{where}: an image_url part needs image_url.url", param=where)
                media.append(MediaPart("image", (url,), where))
                parts.append({"type": "image"})
            elif kind == "video":
                media.append(MediaPart("video", _video_frames(part, limits, where), where))
                parts.append({"type": "video"})
            elif kind == "video_url":
                raise RequestError(
                    400,
                    f"{where}: video_url parts (video files) are not decoded by this server; send the frames: "
                    "{'type': 'video', 'video': ['data:image/png;base64,...', ...]}",
                    param=where,
                    code="unsupported_content",
                )
            else:
                raise RequestError(
                    400, f"{where}: unsupported content type {kind!r} (text, image_url, video)", param=where
                )
        messages.append({"role": message.role, "content": parts})
    if len(media) > limits.max_images:
        raise RequestError(
            400,
            f"{len(media)} images exceed this server's limit of {limits.max_images} (a video counts as one)",
            param="messages",
        )
    return messages, texts, media
