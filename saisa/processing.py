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

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, TextKwargs
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

from saisa.vision import ImagePreprocessing

IMAGE_TOKEN = "<image>"
PROCESSOR_FILE = "saisa_processor.json"  # still written beside processor_config.json: older saisa versions read it


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


def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)):
        images = [images]
    flat = []
    for item in images:
        flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in flat]


def _as_pil(image) -> Image.Image:
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


def _pil_twin(image_processor: BaseImageProcessor) -> BaseImageProcessor:
    """The PIL backend of an image processor, with all its settings. AutoImageProcessor picks the torchvision
    backend wherever torchvision imports; the PIL one is what LLaVA-1.5 trained with, bit for bit, so a GPU machine
    preprocesses exactly as a CPU one."""
    import transformers

    name = type(image_processor).__name__
    if name.endswith("Pil") or name == "SaisaImageProcessor":
        return image_processor
    twin = getattr(transformers, name.removesuffix("Fast") + "Pil", None)
    if twin is None:
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "backend")}
    return twin(**settings)


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


class SaisaProcessorKwargs(ProcessingKwargs, total=False):
    # Prompts are tokenised exactly as rendered (templates carry their own BOS, as training tokenises them), batches
    # padded on the left for generation.
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": False}}


def _content_is_list(template: str) -> bool:
    """Whether a chat template reads message content as a list of `{"type": ...}` items (transformers' message
    format, e.g. llava-hf's templates) rather than as a string (most LLM templates): it loops over, indexes or filters
    a `content` (read off the template's Jinja syntax tree, as vLLM detects a template's content format)."""
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} block (assistant masks): parsed as its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            return nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True), lineno=lineno)

    def reads_content(node) -> bool:
        return any(
            (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content")
            or (isinstance(n, nodes.Getattr) and n.attr == "content")
            for n in [node, *node.find_all((nodes.Getitem, nodes.Getattr))]
        )

    tree = ImmutableSandboxedEnvironment(extensions=[Generation]).parse(template)
    for loop in tree.find_all(nodes.For):
        if reads_content(loop.iter):
            return True
    for item in tree.find_all(nodes.Getitem):  # message['content'][0]['text']
        if isinstance(item.node, (nodes.Getitem, nodes.Getattr)) and reads_content(item.node):
            return True
    return False


class SaisaProcessor(ProcessorMixin):
    valid_processor_kwargs = SaisaProcessorKwargs

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
        chat_template: default the tokenizer's; one template serves the processor and the tokenizer (training renders
            conversations with the tokenizer's).
        template: a named conversation template (`saisa.data.templates`: vicuna_v1, llama3, chatml) used instead of
            the chat template, as checkpoints trained with one expect.
        pad_to_square: LLaVA-1.5's `image_aspect_ratio="pad"`: centre each image on a square of the mean colour before
            the image processor resizes it."""
        if isinstance(image_processor, ImagePreprocessing):
            image_processor = image_processor.image_processor()
        else:
            image_processor = _pil_twin(image_processor)
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([image_token], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is None:
            chat_template = tokenizer.chat_template
        elif tokenizer.chat_template != chat_template:
            tokenizer.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.template = template
        self.pad_to_square = pad_to_square
        super().__init__(tokenizer, image_processor, chat_template=chat_template)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.of(self.image_processor)

    # -- images --------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image], **images_kwargs) -> torch.Tensor:
        """PIL images -> (N, 3, S, S): pad to square with the mean colour (LLaVA-1.5), then the image processor
        (`images_kwargs` override its settings for this call)."""
        images = [_as_pil(image) for image in images]
        if not images:
            side = self.preprocessing.image_size
            return torch.zeros(0, 3, side, side)
        if self.pad_to_square:
            mean = images_kwargs.get("image_mean") or self.image_processor.image_mean
            fill = tuple(int(c * 255) for c in mean)
            images = [expand_to_square(image, fill) for image in images]
        images_kwargs = {k: v for k, v in images_kwargs.items() if v is not None}
        images_kwargs["return_tensors"] = "pt"
        return self.image_processor(images, **images_kwargs)["pixel_values"]

    # -- text ----------------------------------------------------------------------------------------------------------
    def __call__(
        self, images: ImageInput | None = None, text: str | Sequence[str] | None = None, **kwargs
    ) -> BatchFeature:
        """transformers' order and kwargs (`text_kwargs`, `images_kwargs`, `common_kwargs` or flat, merged as
        `ProcessorMixin._merge_kwargs` does over `SaisaProcessorKwargs._defaults`). Prompts hold `<image>` once per
        image; `images` (PIL images, arrays or paths, flat or per prompt) are every prompt's images in order.

        Truncation never cuts an `<image>` whose image is given: such a call is refused (`ValueError`)."""
        if images is None and text is None:
            raise ValueError("SaisaProcessor needs text, images or both")
        merged = self._merge_kwargs(
            SaisaProcessorKwargs,
            tokenizer_init_kwargs=self.tokenizer.init_kwargs,
            **kwargs,
        )
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.get("return_tensors")
        images_kwargs.pop("return_tensors", None)
        # newer transformers (5.25) merge these two beside the modality kwargs, older ones (5.19) into text_kwargs
        return_offsets = text_kwargs.pop(
            "return_text_replacement_offsets", merged.get("return_text_replacement_offsets")
        )
        return_mm_types = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids"))
        text_kwargs.pop("sanitize_control_tokens", None)
        flat = _flatten_images(images)
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            placeholders = [t.count(self.image_token) for t in texts]
            if sum(placeholders) != len(flat):
                raise ValueError(
                    f"the text holds {sum(placeholders)} {self.image_token} placeholder(s) but {len(flat)} "
                    "image(s) were given"
                )
            encoded = self.tokenizer(texts, **text_kwargs)
            self._refuse_cut_images(encoded["input_ids"], placeholders, text_kwargs)
            data = dict(encoded)
            if return_mm_types:  # 1 where an image goes (transformers' convention: 1 image, 2 video)
                data["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in row] for row in data["input_ids"]]
            if return_offsets:  # each <image> stays itself: the model, not the text, expands it
                data["text_replacement_offsets"] = [self._image_spans(t) for t in texts]
        if flat:
            data["pixel_values"] = self.preprocess_images(flat, **images_kwargs)
        return BatchFeature(data, tensor_type=return_tensors)

    def _image_spans(self, text: str) -> list[dict]:
        spans, start = [], text.find(self.image_token)
        while start >= 0:
            end = start + len(self.image_token)
            spans.append(
                {"type": "image", "span": (start, end), "new_span": (start, end), "replacement": self.image_token}
            )
            start = text.find(self.image_token, end)
        return spans

    def _refuse_cut_images(self, input_ids, placeholders: list[int], text_kwargs: dict) -> None:
        for row, (ids, expected) in enumerate(zip(input_ids, placeholders, strict=True)):
            kept = list(ids).count(self.image_token_id)
            if kept != expected:
                raise ValueError(
                    f"truncation (max_length={text_kwargs.get('max_length')}) cut {expected - kept} of the "
                    f"{expected} {self.image_token} placeholder(s) of prompt {row} while its images were given: "
                    "raise max_length, shorten the text, or drop those images"
                )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens each image gets in the input ids: one `<image>` whatever the image's size (the model
        expands it to its v visual positions)."""
        data = {}
        if image_sizes is not None:
            data = {"num_image_tokens": [1] * len(image_sizes), "num_image_patches": [1] * len(image_sizes)}
        return MultiModalData(**data)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template` (same arguments and defaults). A template written for transformers'
        message format (content lists of `{"type": "image"}` / `{"type": "text", "text": ...}` items, e.g. llava-hf's)
        renders the messages as they are; one reading string content (most LLM templates, and the named `template`)
        gets each content list flattened to text, an image item becoming `<image>\\n`."""
        if isinstance(chat_template, str) and chat_template in (self.chat_template or {}):
            chat_template = self.chat_template[chat_template]  # a named template of a dict
        resolved = chat_template or self.chat_template
        if isinstance(resolved, dict):
            resolved = resolved.get("default")
        if self.template is None and resolved is not None and _content_is_list(resolved):
            return super().apply_chat_template(conversation, chat_template, **kwargs)
        return self._apply_string_template(conversation, chat_template, **kwargs)

    def _apply_string_template(
        self,
        conversation,
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        processor_kwargs = dict(processor_kwargs or {})
        for key in list(kwargs):  # flat processing kwargs, as transformers accepts them beside template variables
            if key in TextKwargs.__annotations__ or key in ImagesKwargs.__annotations__:
                processor_kwargs[key] = kwargs.pop(key)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        prompts, image_items = [], []
        for messages in conversation if batched else [conversation]:
            rendered = []
            for message in messages:
                content = message.get("content")
                if content is not None and not isinstance(content, str):
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
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors
        inputs = self(text=prompts if batched else prompts[0], images=images or None, **processor_kwargs)
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
                chat_template=chat_template or self.chat_template,
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
        from saisa.portable import AUTO_MODULE, add_auto_map

        add_auto_map(Path(save_directory) / PROCESSOR_NAME, {"AutoProcessor": f"{AUTO_MODULE}.{type(self).__name__}"})
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
