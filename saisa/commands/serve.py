"""`saisa serve MODEL`: an OpenAI-compatible HTTP server on 127.0.0.1 (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from saisa.loading import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saisa.serving.protocol import ServerLimits

    parser.add_argument("model", help="a saved model folder (model + processor)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the id clients name (default: the folder name)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SAISA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $SAISA_API_KEY, else open)",
    )
    parser.add_argument(
        "--allow-local-images",
        metavar="DIR",
        help="let requests name local image files, only under DIR (off by default)",
    )
    limits = ServerLimits()  # the defaults live there; docs/serving.md lists them
    parser.add_argument(
        "--max-tokens", type=int, default=limits.max_tokens, help="largest max_tokens a request may ask"
    )
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="larger bodies get 413")
    parser.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes)
    parser.add_argument("--max-images", type=int, default=limits.max_images, help="images per request")
    parser.add_argument(
        "--max-image-pixels", type=int, default=limits.max_image_pixels, help="per image, read from its header"
    )
    parser.add_argument(
        "--max-aspect-ratio", type=float, default=limits.max_aspect_ratio, help="longest over shortest side"
    )
    parser.add_argument(
        "--max-request-pixels", type=int, default=limits.max_request_pixels, help="all of a request's images"
    )
    parser.add_argument(
        "--max-inflight-pixels",
        type=int,
        default=limits.max_inflight_pixels,
        help="image pixels decoded at once across requests (more wait)",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=limits.max_prompt_chars,
        help="characters of text per request, refused before tokenising (default: context length x longest token)",
    )
    parser.add_argument("--max-queue", type=int, default=limits.max_queue, help="waiting requests; more get 503")
    parser.add_argument(
        "--max-inflight-body-bytes",
        type=int,
        default=limits.max_inflight_body_bytes,
        help="request bodies buffered at once across requests; more get 503",
    )
    parser.add_argument(
        "--body-timeout", type=float, default=limits.body_timeout_s, help="seconds for a body to arrive (408 past it)"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=limits.header_timeout_s,
        help="seconds for a request's headers to arrive (the connection is closed past it)",
    )
    parser.add_argument(
        "--keep-alive", type=float, default=limits.keep_alive_s, help="seconds an idle connection stays open"
    )
    parser.add_argument(
        "--max-connections", type=int, default=limits.max_connections, help="open connections; more are closed"
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=limits.prefill_chunk_tokens,
        help="prompt positions prefilled per engine step (longer prompts are prefilled in chunks)",
    )
    parser.add_argument(
        "--stuck-after",
        type=float,
        default=limits.stuck_after_s,
        help="seconds in one engine step before /health reports 503",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=limits.request_timeout_s, help="seconds per request (504 past it)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests prefilled together")
    parser.add_argument("--image-cache-mib", type=int, default=1024, help="image KV cache budget (0: off)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from saisa.loading import load_pretrained
    from saisa.serving.http import uvicorn_config
    from saisa.serving.protocol import ServerLimits
    from saisa.serving.server import create_app

    model, processor = load_pretrained(
        args.model, device=args.device, dtype=args.dtype, image_cache_mib=args.image_cache_mib
    )
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_aspect_ratio=args.max_aspect_ratio,
        max_tokens=args.max_tokens,
        max_request_pixels=args.max_request_pixels,
        max_inflight_pixels=args.max_inflight_pixels,
        max_prompt_chars=args.max_prompt_chars,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        max_inflight_body_bytes=args.max_inflight_body_bytes,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        stuck_after_s=args.stuck_after,
        allowed_image_dir=Path(args.allow_local_images) if args.allow_local_images else None,
    )
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(
        model,
        processor,
        model_name=name,
        api_key=args.api_key,
        limits=limits,
        max_batch_size=args.max_batch_size,
    )
    _enough_descriptors(limits.max_connections)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI chat completions)", flush=True)
    uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port, limits=limits)).run()
    return 0


def _enough_descriptors(connections: int) -> None:
    """Room for every allowed connection plus the model's files and threads: accept() must never fail for want of
    a descriptor (asyncio logs each failed attempt, a flood)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"--max-connections {connections} needs {needed} file descriptors; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
