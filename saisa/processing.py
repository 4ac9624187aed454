"""`SaisaProcessor`: a transformers `ProcessorMixin` over the tokenizer and the encoder's own image processor
(`CLIPImageProcessor`, `SiglipImageProcessor`, or `SaisaImageProcessor` for EfficientNet-Lite), with LLaVA-1.5's pad to
square (mean colour) before it.

`input_ids` carry one `<image>` token per image; the model expands it to v positions itself.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

from saisa.vision import ImagePreprocessing

IMAGE_TOKEN = "<image>"
PROCESSOR_FILE = "saisa_processor.json"  # still written beside processor_config.json: older saisa versions read it
_TOKENIZER_KWARGS = ("padding", "truncation", "max_length", "padding_side", "add_special_tokens")


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an error that names the file (`open_image`'s limits apply)."""
    return open_image(path)


def _flatten_images(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    flat = []
    for item in images:
        flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in flat]


def _content_image(item: dict, index: int) -> Image.Image:
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
    return source if isinstance(source, Image.Image) else load_image(source)


MAX_PAD_SIDE = 4096  # a padded square holds at most 4096² pixels (48 MiB) whatever the image's shape


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


def checkpoint_image_processor(folder: str | os.PathLike, default=None):
    """A checkpoint's own image processor (its `preprocessor_config.json`) where it has one, else `default`."""
    if (Path(folder) / IMAGE_PROCESSOR_NAME).exists():
        return AutoImageProcessor.from_pretrained(folder)
    return default


class SaisaProcessor(ProcessorMixin):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor | ImagePreprocessing,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        template: str | None = None,
        pad_to_square: bool = True,
    ):
        """tokenizer first: the order saisa callers have always used (attributes follow this signature's order).

        image_processor: the encoder's image processor, or the `ImagePreprocessing` it states
            (`model.vision_tower.preprocessing`).
        template: a named conversation template (`saisa.data.templates`: vicuna_v1, llama3, chatml) used instead of
            the tokenizer's chat template, as checkpoints trained with one expect.
        pad_to_square: LLaVA-1.5's `image_aspect_ratio="pad"`: centre each image on a square of the mean colour before
            the image processor resizes it."""
        if not isinstance(image_processor, ImagePreprocessing) and not type(image_processor).__name__.endswith(
            ("Pil", "SaisaImageProcessor")
        ):
            # AutoImageProcessor picks the torchvision backend wherever torchvision imports; the PIL one is what
            # LLaVA-1.5 trained with, bit for bit, so a GPU machine preprocesses exactly as a CPU one.
            image_processor = ImagePreprocessing.of(image_processor)
        if isinstance(image_processor, ImagePreprocessing):
            image_processor = image_processor.image_processor()
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([image_token], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.image_token = image_token
        self.template = template
        self.pad_to_square = pad_to_square
        super().__init__(tokenizer, image_processor)

    @property
    def chat_template(self) -> str | dict | None:
        # One template, the tokenizer's: training renders conversations with it too (saisa.data.templates).
        return self.tokenizer.chat_template

    @chat_template.setter
    def chat_template(self, value: str | dict | None) -> None:
        if value is not None:  # ProcessorMixin.__init__ assigns None before the tokenizer is set
            self.tokenizer.chat_template = value

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.of(self.image_processor)

    # -- images --------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, S, S): pad to square with the mean colour (LLaVA-1.5), then the image processor."""
        images = list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
        if not images:
            side = self.preprocessing.image_size
            return torch.zeros(0, 3, side, side)
        images = [image.convert("RGB") for image in images]
        if self.pad_to_square:
            fill = tuple(int(c * 255) for c in self.image_processor.image_mean)
            images = [expand_to_square(image, fill) for image in images]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    # -- text ----------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        *,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        add_special_tokens: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise prompts holding `<image>` once per image; `images` (PIL images or paths, flat or per prompt) are
        every prompt's images in order. Text comes first positionally; `images=`/`text=` keywords work as usual."""
        flat = _flatten_images(images)
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(self.image_token) for t in texts)
            if placeholders != len(flat):
                raise ValueError(
                    f"the text holds {placeholders} {self.image_token} placeholder(s) but {len(flat)} "
                    "image(s) were given"
                )
            kwargs.setdefault("padding", True)
            encoded = self.tokenizer(
                texts,
                padding_side=padding_side,
                return_tensors=return_tensors,
                add_special_tokens=add_special_tokens,
                **kwargs,
            )
            data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """Messages whose content is a string or a list of `{"type": "text", "text": ...}` / `{"type": "image"}` items.

        tokenize=False: the prompt string (a list for a batch of conversations). tokenize=True: `input_ids` (and with
        return_dict=True `attention_mask` and `pixel_values`, the images of the items in order: each image item then
        needs its `"image"`, `"url"` or `"path"`)."""
        call_kwargs = {**(processor_kwargs or {}), **{k: kwargs.pop(k) for k in _TOKENIZER_KWARGS if k in kwargs}}
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        prompts, image_items = [], []
        for messages in conversation if batched else [conversation]:
            rendered = []
            for message in messages:
                content = message["content"]
                if not isinstance(content, str):
                    parts = []
                    for item in content:
                        kind = item.get("type")
                        if kind == "image":
                            parts.append(self.image_token + "\n")
                            image_items.append(item)
                        elif kind == "text":
                            parts.append(item["text"])
                        else:
                            raise ValueError(f"unknown content type {kind!r}; use 'text' or 'image'")
                    content = "".join(parts)
                rendered.append({**message, "content": content})
            prompts.append(
                self._render(rendered, chat_template, add_generation_prompt, continue_final_message, **kwargs)
            )
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [_content_image(item, i) for i, item in enumerate(image_items)]
        inputs = self(prompts, images=images or None, return_tensors=return_tensors, **call_kwargs)
        return inputs if return_dict else inputs["input_ids"]

    def _render(
        self,
        messages: list[dict],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        **kwargs,
    ) -> str:
        if self.template is None:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        if continue_final_message:
            raise ValueError(
                f"continue_final_message needs a chat template; the named template {self.template!r} "
                "closes every assistant turn"
            )
        from saisa.data.templates import get_template

        return get_template(self.template).render(messages, add_generation_prompt=add_generation_prompt).text

    # -- persistence ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        files = super().save_pretrained(save_directory, **kwargs)
        p = self.preprocessing
        settings = {
            "image_token": self.image_token,
            "image_size": p.image_size,
            "image_mean": list(p.image_mean),
            "image_std": list(p.image_std),
            "template": self.template,
        }
        legacy = Path(save_directory) / PROCESSOR_FILE
        legacy.write_text(json.dumps(settings, indent=2))
        return [*files, str(legacy)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SaisaProcessor:
        """Folders written by `save_pretrained`, and older ones holding only `saisa_processor.json` and the tokenizer;
        a `preprocessor_config.json` beside either (a checkpoint's own image processor) is read."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir() or (folder / PROCESSOR_NAME).exists():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        legacy = folder / PROCESSOR_FILE
        settings = json.loads(legacy.read_text()) if legacy.exists() else {}
        image_processor = checkpoint_image_processor(
            folder,
            settings
            and ImagePreprocessing(settings["image_size"], tuple(settings["image_mean"]), tuple(settings["image_std"])),
        )
        if not image_processor:
            raise FileNotFoundError(
                f"{folder} holds no {PROCESSOR_NAME}, {IMAGE_PROCESSOR_NAME} or {PROCESSOR_FILE}: "
                "not a folder written by SaisaProcessor.save_pretrained"
            )
        return cls(
            AutoTokenizer.from_pretrained(folder, **kwargs),
            image_processor,
            image_token=settings.get("image_token", IMAGE_TOKEN),
            template=settings.get("template"),
        )
