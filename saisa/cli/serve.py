"""`saisa serve MODEL`: an OpenAI-compatible HTTP server on 127.0.0.1 (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from saisa.checkpoints.loading import add_device_arguments
from saisa.serving.protocol import ServerLimits

# flag -> (ServerLimits field, type, help); each default is the field's own (docs/serving.md lists them)
LIMIT_FLAGS = {
    "--max-tokens": ("max_tokens", int, "largest max_tokens a request may ask"),
    "--max-body-bytes": ("max_body_bytes", int, "larger bodies get 413"),
    "--max-image-bytes": ("max_image_bytes", int, None),
    "--max-images": ("max_images", int, "images and videos per request"),
    "--max-video-frames": ("max_video_frames", int, "frames a video part may list (8 of them are kept)"),
    "--max-views": ("max_views", int, "encoder inputs per request: image views (base + tiles), video frames"),
    "--max-image-pixels": ("max_image_pixels", int, "per image, read from its header"),
    "--max-aspect-ratio": ("max_aspect_ratio", float, "longest over shortest side"),
    "--max-request-pixels": ("max_request_pixels", int, "all of a request's images"),
    "--max-inflight-pixels": ("max_inflight_pixels", int, "image pixels decoded at once across requests (more wait)"),
    "--max-prompt-chars": (
        "max_prompt_chars",
        int,
        "text per request, refused before tokenising (default: context length x longest token)",
    ),
    "--max-queue": ("max_queue", int, "waiting requests; more get 503"),
    "--max-inflight-body-bytes": ("max_inflight_body_bytes", int, "bodies buffered at once across requests; more: 503"),
    "--body-timeout": ("body_timeout_s", float, "seconds for a body to arrive (408 past it)"),
    "--header-timeout": ("header_timeout_s", float, "seconds for a request's headers to arrive (closed past it)"),
    "--keep-alive": ("keep_alive_s", float, "seconds an idle connection stays open"),
    "--max-connections": ("max_connections", int, "open connections; more are closed"),
    "--prefill-chunk-tokens": ("prefill_chunk_tokens", int, "prompt positions prefilled per engine step"),
    "--stuck-after": ("stuck_after_s", float, "seconds in one engine step before /health reports 503"),
    "--request-timeout": ("request_timeout_s", float, "seconds per request (504 past it)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved model folder (model + processor)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the id clients name (default: the folder name)")
    key_help = "require 'Authorization: Bearer KEY' (default: $SAISA_API_KEY, else open)"
    parser.add_argument("--api-key", default=os.environ.get("SAISA_API_KEY"), help=key_help)
    parser.add_argument("--allow-local-images", metavar="DIR", help="let requests name local image files under DIR")
    defaults = ServerLimits()
    for flag, (field, kind, help_text) in LIMIT_FLAGS.items():
        parser.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field), help=help_text)
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests prefilled together")
    parser.add_argument("--image-cache-mib", type=int, default=1024, help="image KV cache budget (0: off)")
    tiles_help = "tile images on grids of 2 to N tiles beside the base view (default: the processor's own tiling)"
    parser.add_argument("--max-tiles", type=int, help=tiles_help)
    pruning_help = "keep this fraction of each image's visual K/V (FastV-style score at layer 2; saisa.model.pruning)"
    parser.add_argument("--visual-keep-ratio", type=float, help=pruning_help)
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from saisa.checkpoints.loading import load_pretrained
    from saisa.serving.http import run_server
    from saisa.serving.server import create_app

    model, processor = load_pretrained(
        args.model, device=args.device, dtype=args.dtype, image_cache_mib=args.image_cache_mib
    )
    limits = ServerLimits(
        **{field: getattr(args, field) for field, _, _ in LIMIT_FLAGS.values()},
        allowed_image_dir=Path(args.allow_local_images) if args.allow_local_images else None,
    )
    name = args.model_name or Path(args.model).resolve().name
    settings = dict(api_key=args.api_key, limits=limits, max_batch_size=args.max_batch_size, max_tiles=args.max_tiles)
    if args.visual_keep_ratio is not None:
        settings["visual_pruning"] = {"keep_ratio": args.visual_keep_ratio}
    app = create_app(model, processor, model_name=name, **settings)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (OpenAI chat completions)", flush=True)
    run_server(app, host=args.host, port=args.port, limits=limits)
    return 0
