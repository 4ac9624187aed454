"""Images in: open (with size limits checked from the header, before decoding), flatten nested lists, convert arrays,
pad to a square as LLaVA-1.5 does."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class ImageRefused(ValueError):
    """An image refused by a size limit before decoding."""


def open_image(
    source,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    max_aspect_ratio: float | None = None,
    header_only: bool = False,
) -> Image.Image | tuple[int, int]:
    """Decode an image (a path, bytes or a binary file) as RGB, refusing from its header, before any pixel is
    decoded, one with more than `max_pixels` pixels (default: `PIL.Image.MAX_IMAGE_PIXELS`, PIL's decompression-bomb
    limit) or a side more than `max_aspect_ratio` times the other. Errors are `ValueError`s naming the image (`name`,
    else the path); a missing file is a `FileNotFoundError`. header_only: (width, height) once the checks pass,
    nothing decoded."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(source) as image:
            width, height = image.size  # read from the header: nothing is decoded yet
            if limit and width * height > limit:
                raise ImageRefused(
                    f"refusing image {name}: {width}x{height} = {width * height} pixels exceed the limit of {limit}"
                    + (" (PIL.Image.MAX_IMAGE_PIXELS, against decompression bombs)" if max_pixels is None else "")
                )
            if max_aspect_ratio and max(width, height) > max_aspect_ratio * max(1, min(width, height)):
                raise ImageRefused(
                    f"refusing image {name}: {width}x{height} is more than {max_aspect_ratio:g} times as long as wide"
                )
            return (width, height) if header_only else image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {name}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"refusing image {name}: {error}") from None
    except ImageRefused:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode image {name}: not an image format PIL reads") from None
    except (OSError, SyntaxError, EOFError, ValueError) as error:  # PIL's decoders raise these on broken files
        raise ValueError(f"cannot decode image {name}: {error}") from None


def flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)):
        images = [images]
    flat = []
    for item in images:
        flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return [open_image(item) if isinstance(item, (str, os.PathLike)) else item for item in flat]


def as_pil(image) -> Image.Image:
    """An RGB PIL image of a PIL image or an (H, W, C) / (C, H, W) uint8 array or tensor."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
        if array.dtype != np.uint8:
            array = np.clip(array * 255 if array.max() <= 1 else array, 0, 255).astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).convert("RGB")
    raise TypeError(f"expected a PIL image, an array or a path, got {type(image).__name__}")


def content_image(item: dict, index: int) -> Image.Image:
    """The image of a chat content item `{"type": "image", "image" | "url" | "path": PIL image or path}`."""
    source = next((item[key] for key in ("image", "url", "path") if item.get(key) is not None), None)
    if source is None:
        raise ValueError(
            f"image content item {index} has no image: give {{'type': 'image', 'image': <PIL image or "
            "path>}} (or 'url' / 'path'), or render the prompt with tokenize=False"
        )
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        from transformers.image_utils import load_image as load_url

        try:
            return load_url(source).convert("RGB")
        except Image.DecompressionBombError as error:
            raise ValueError(f"refusing image {source}: {error}") from None
    return source if isinstance(source, Image.Image) else open_image(source)


MAX_PAD_SIDE = 4096  # a padded square holds at most 4096² pixels (48 MiB) whatever the image's shape


def content_video(item: dict, index: int):
    """The frames of a chat content item `{"type": "video", "video": [frames] | (T, H, W, 3) array}` (frames: PIL
    images, arrays or paths). Video files are not decoded here: give their frames."""
    video = item.get("video")
    if isinstance(video, (str, os.PathLike)) or video is None:
        raise ValueError(
            f"video content item {index} must hold its frames: {{'type': 'video', 'video': [frame, ...]}} (PIL "
            "images, arrays or paths) or a (T, H, W, 3) array; video files are not decoded here"
        )
    return video


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: the image centred on a square of colour `fill`. An image longer than
    `MAX_PAD_SIDE` is first shrunk to it (a 1x40000 strip would otherwise ask for a 40000² square, 4.8 GB); any
    smaller image is padded exactly as LLaVA-1.5 does."""
    if max(image.size) > MAX_PAD_SIDE:
        scale = MAX_PAD_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    side = max(image.size)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square
