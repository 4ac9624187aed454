"""What the vision encoder sees of one `<image>` or `<video>`: its views, each one fixed-size encoder input.

- An image is one view, or with AnyRes tiling LLaVA-NeXT's views: a base view of the whole image followed by the tiles
  of a grid chosen from its aspect ratio (the image resized into the grid's resolution, aspect ratio kept, padded
  black, cut into encoder-sized tiles row by row).
- A video is its frames, `num_frames` of them sampled uniformly (every frame when it has fewer), one view each.

The processor puts one `<image>` placeholder per view, adjacent, where the image or video was: each takes the encoder's
v positions, so a tiled image or a video is one contiguous visual span of views x v positions, and the model, the KV
caches and every architecture treat its views as images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from saisa.processing.images import as_pil, open_image

NUM_FRAMES = 8  # frames kept of each video unless a call says otherwise (LLaVA-NeXT-Video's default: 8 to 32)


def anyres_grid_pinpoints(side: int, max_tiles: int = 4) -> list[list[int]]:
    """[height, width] in pixels of every grid of 2..max_tiles tiles of side x side (LLaVA-NeXT's
    `image_grid_pinpoints` for a 336 px encoder and max_tiles=4 hold these five and two more: 1x4, 4x1)."""
    if max_tiles < 2:
        raise ValueError(f"max_tiles must be at least 2 (a grid of one tile is the base view again), got {max_tiles}")
    return [
        [rows * side, cols * side]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if 1 < rows * cols <= max_tiles
    ]


def tile_grid(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], side: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (width, height) pixels: LLaVA-NeXT's choice (the grid that keeps the most
    of the image's resolution, then wastes the least)."""
    width, height = image_size
    best_height, best_width = select_best_resolution((height, width), [tuple(p) for p in pinpoints])
    return best_height // side, best_width // side


def views_per_image(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]] | None, side: int) -> int:
    """How many views (so `<image>` placeholders) an image of (width, height) pixels becomes."""
    if not pinpoints:
        return 1
    rows, cols = tile_grid(image_size, pinpoints, side)
    return 1 + rows * cols


def image_views(image: Image.Image, pinpoints: Sequence[Sequence[int]] | None, side: int) -> list[Image.Image]:
    """[image] without pinpoints; with them LLaVA-NeXT's views: the whole image squashed to side x side, then its
    tiles row by row (the image resized into the chosen grid, aspect ratio kept, centred on black)."""
    if not pinpoints:
        return [image]
    rows, cols = tile_grid(image.size, pinpoints, side)
    grid_width, grid_height = cols * side, rows * side
    scale_width, scale_height = grid_width / image.width, grid_height / image.height
    if scale_width < scale_height:  # LLaVA-NeXT's get_patch_output_size
        width, height = grid_width, min(math.ceil(image.height * scale_width), grid_height)
    else:
        width, height = min(math.ceil(image.width * scale_height), grid_width), grid_height
    canvas = Image.new("RGB", (grid_width, grid_height), (0, 0, 0))
    canvas.paste(image.resize((width, height), Image.BICUBIC), ((grid_width - width) // 2, (grid_height - height) // 2))
    tiles = [
        canvas.crop((col * side, row * side, (col + 1) * side, (row + 1) * side))
        for row in range(rows)
        for col in range(cols)
    ]
    return [image.resize((side, side), Image.BICUBIC), *tiles]


def video_frames(video, num_frames: int) -> list[Image.Image]:
    """A video (a list of frames: PIL images, arrays or paths; or a (T, H, W, 3) array / tensor) -> `num_frames`
    frames sampled uniformly, first and last included (all of them when it has fewer)."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ValueError(f"a video array must be (frames, height, width, channels), got shape {tuple(video.shape)}")
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise ValueError(f"a video is a list of frames or a (T, H, W, 3) array, got {type(video).__name__}")
    if not frames:
        raise ValueError("a video needs at least one frame")
    kept = [frames[i] for i in frame_indices(len(frames), num_frames)]
    return [open_image(frame) if isinstance(frame, (str, os.PathLike)) else as_pil(frame) for frame in kept]


def frame_indices(count: int, num_frames: int) -> list[int]:
    """Which of a video's `count` frames are kept: `num_frames` sampled uniformly, first and last included (all of
    them when it has fewer)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if count <= num_frames:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, num_frames).round()]


def repeat_placeholders(ids: list[int], image_token_id: int, views: Sequence[int], *aligned: list) -> list[list]:
    """Token ids with one `image_token_id` per image or video -> `views[i]` adjacent copies of the i-th, as
    `SaisaProcessor` writes its text; each list in `aligned` (labels) is repeated with `ids`.
    Returns [ids, *aligned]."""
    if (found := ids.count(image_token_id)) != len(views):  # e.g. a template whose placeholder split into pieces
        raise ValueError(f"the prompt holds {found} image tokens for {len(views)} images and videos")
    counts, columns = iter(views), [[] for _ in range(1 + len(aligned))]
    for values in zip(ids, *aligned, strict=True):
        copies = next(counts) if values[0] == image_token_id else 1
        for column, value in zip(columns, values, strict=True):
            column += [value] * copies
    return columns
