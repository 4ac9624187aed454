"""OpenAI chat-completions requests: validation and conversion to a prompt plus images, with errors that name the
problem (`RequestError` carries the HTTP status)."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field


class RequestError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


@dataclass(frozen=True)
class ServerLimits:
    max_image_bytes: int = 10 * 2**20
    max_images: int = 8
    max_prompt_positions: int | None = None  # default: the LLM's maximum
    max_tokens: int = 512
    allowed_image_dir: Path | None = None  # local files readable only under here, and only when set


def decode_image(url: str, limits: ServerLimits, where: str) -> Image.Image:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError(400, f"{where}: only base64 data URLs are supported", param=where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(
                400, f"{where}: image larger than {limits.max_image_bytes} bytes", param=where, code="image_too_large"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{where}: the data URL is not valid base64", param=where) from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        raise RequestError(400, f"{where}: remote image URLs are not fetched; send a base64 data URL", param=where)
    else:
        path = Path(url.removeprefix("file://"))
        if limits.allowed_image_dir is None:
            raise RequestError(
                403, f"{where}: reading local files is disabled on this server", param=where, code="path_not_allowed"
            )
        resolved, root = path.resolve(), limits.allowed_image_dir.resolve()
        if not resolved.is_relative_to(root):
            raise RequestError(
                403, f"{where}: {path} is outside the allowed folder", param=where, code="path_not_allowed"
            )
        if not resolved.is_file():
            raise RequestError(400, f"{where}: image file {path} not found", param=where)
        if resolved.stat().st_size > limits.max_image_bytes:
            raise RequestError(
                400, f"{where}: image larger than {limits.max_image_bytes} bytes", param=where, code="image_too_large"
            )
        source = resolved
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise RequestError(400, f"{where}: the image cannot be decoded", param=where, code="invalid_image") from None


def to_prompt(request: ChatCompletionRequest, processor, limits: ServerLimits) -> tuple[str, list[Image.Image]]:
    """Render the messages with the model's chat template; images in order of appearance."""
    messages, images = [], []
    for m, message in enumerate(request.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts = []
        for p, part in enumerate(message.content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{where}: a text part needs a string 'text'", param=where)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(400, f"{where}: an image_url part needs image_url.url", param=where)
                images.append(decode_image(url, limits, where))
                parts.append({"type": "image"})
            else:
                raise RequestError(400, f"{where}: unsupported content type {kind!r} (text, image_url)", param=where)
        messages.append({"role": message.role, "content": parts})
    if len(images) > limits.max_images:
        raise RequestError(
            400, f"{len(images)} images exceed this server's limit of {limits.max_images}", param="messages"
        )
    return processor.apply_chat_template(messages, add_generation_prompt=True), images
