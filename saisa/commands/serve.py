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
    parser.add_argument("--max-queue", type=int, default=limits.max_queue, help="waiting requests; more get 503")
    parser.add_argument(
        "--request-timeout", type=float, default=limits.request_timeout_s, help="seconds per request (504 past it)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests prefilled together")
    parser.add_argument("--image-cache-mib", type=int, default=1024, help="image KV cache budget (0: off)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from saisa.loading import load_pretrained
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
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        allowed_image_dir=Path(args.allow_local_images) if args.allow_local_images else None,
    )
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(
        model, processor, model_name=name, api_key=args.api_key, limits=limits, max_batch_size=args.max_batch_size
    )
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI chat completions)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
