"""`SaisaProcessor`: a transformers `ProcessorMixin` over the tokenizer and the encoder's own image processor
(`CLIPImageProcessor`, `SiglipImageProcessor`, or `SaisaImageProcessor` for EfficientNet-Lite), with LLaVA-1.5's pad to
square (mean colour) before it.

`input_ids` carry one `<image>` token per view (`saisa.processing.views`: an image is one view, or with AnyRes tiling a
base view and its tiles; a `<video>` is its sampled frames); the model expands each to v positions itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, TextKwargs
from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

from saisa.components.encoders import ImagePreprocessing
from saisa.processing.images import as_pil, content_image, content_video, expand_to_square, flatten_images
from saisa.processing.templates import IMAGE_TOKEN, VIDEO_TOKEN
from saisa.processing.views import NUM_FRAMES, image_views, video_frames, views_per_image


def _pil_twin(image_processor: BaseImageProcessor) -> BaseImageProcessor:
    """The PIL backend of an image processor, with all its settings. AutoImageProcessor picks the torchvision
    backend wherever torchvision imports; the PIL one is what LLaVA-1.5 trained with, bit for bit, so a GPU machine
    preprocesses exactly as a CPU one. transformers' own backend table names the twin; a processor it does not list
    as a torchvision backend (a PIL one, one of ours) is kept."""
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    name = type(image_processor).__name__
    twin = next(
        (
            backends["pil"]
            for backends in IMAGE_PROCESSOR_MAPPING_NAMES.values()
            if backends.get("torchvision") == name and backends.get("pil")
        ),
        None,
    )
    if twin is None:
        return image_processor
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "backend")}
    return get_image_processor_class_from_name(twin)(**settings)


def checkpoint_image_processor(folder: str | os.PathLike, default=None):
    """A checkpoint's own image processor (its `preprocessor_config.json`) where it has one, else `default`."""
    if (Path(folder) / IMAGE_PROCESSOR_NAME).exists():
        return AutoImageProcessor.from_pretrained(folder)
    return default


class SaisaProcessorKwargs(ProcessingKwargs, total=False):
    # Prompts are tokenised exactly as rendered (templates carry their own BOS, as training tokenises them), batches
    # padded on the left for generation.
    _defaults = {
        "text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": False},
        "videos_kwargs": {"num_frames": NUM_FRAMES},
    }


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
        image_grid_pinpoints: list[list[int]] | None = None,
        video_token: str = VIDEO_TOKEN,
    ):
        """tokenizer first: the order saisa callers have always used (attributes follow this signature's order).

        image_processor: the encoder's image processor, or the `ImagePreprocessing` it states
            (`model.vision_tower.preprocessing`).
        chat_template: default the tokenizer's; one template serves the processor and the tokenizer (training renders
            conversations with the tokenizer's).
        template: a named conversation template (`saisa.processing.templates`: vicuna_v1, llama3, chatml) used
            instead of the chat template, as checkpoints trained with one expect.
        pad_to_square: LLaVA-1.5's `image_aspect_ratio="pad"`: centre each image on a square of the mean colour before
            the image processor resizes it.
        image_grid_pinpoints: AnyRes tiling (LLaVA-NeXT's name and format): the [height, width] grids in pixels, each
            a multiple of the encoder's image side, one of which each image is tiled on beside its base view
            (`saisa.processing.views.anyres_grid_pinpoints` makes them); None: one view per image.
        video_token: the video placeholder in text (a call's `num_frames`, default 8, says how many frames of each
            video are kept)."""
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
        side = ImagePreprocessing.of(image_processor).image_size
        for pinpoint in image_grid_pinpoints or []:
            if len(pinpoint) != 2 or any(p <= 0 or p % side for p in pinpoint):
                raise ValueError(
                    f"image_grid_pinpoints must be [height, width] pairs of positive multiples of the encoder's image "
                    f"side {side}, got {pinpoint}"
                )
        self.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints] if image_grid_pinpoints else None
        self.video_token = video_token
        super().__init__(tokenizer, image_processor, chat_template=chat_template)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.of(self.image_processor)

    # -- images --------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image], **images_kwargs) -> torch.Tensor:
        """PIL images -> (N, 3, S, S): pad to square with the mean colour (LLaVA-1.5), then the image processor
        (`images_kwargs` override its settings for this call)."""
        images = [as_pil(image) for image in images]
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

    def views(self, item, kind: str = "image", num_frames: int = NUM_FRAMES) -> list[Image.Image]:
        """The encoder inputs of one image (`kind="image"`: itself, or its base view and tiles) or one video
        (`kind="video"`: `num_frames` of its frames), one `<image>` placeholder each."""
        if kind == "video":
            return video_frames(item, num_frames)
        return image_views(as_pil(item), self.image_grid_pinpoints, self.preprocessing.image_size)

    def num_views(self, image_size: tuple[int, int]) -> int:
        """Placeholders an image of (width, height) pixels becomes: known from its size alone (a header read)."""
        return views_per_image(image_size, self.image_grid_pinpoints, self.preprocessing.image_size)

    def max_views(self, num_frames: int = NUM_FRAMES) -> int:
        """The most placeholders one image or video (of `num_frames` frames) can become."""
        side = self.preprocessing.image_size
        tiles = max((h // side) * (w // side) for h, w in self.image_grid_pinpoints) if self.image_grid_pinpoints else 0
        return max(1 + tiles, num_frames)

    # -- text ----------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | Sequence[str] | None = None,
        videos=None,
        **kwargs,
    ) -> BatchFeature:
        """transformers' order and kwargs (`text_kwargs`, `images_kwargs`, `common_kwargs` or flat, merged as
        `ProcessorMixin._merge_kwargs` does over `SaisaProcessorKwargs._defaults`). Prompts hold `<image>` once per
        image and `<video>` once per video; `images` (PIL images, arrays or paths, flat or per prompt) are every
        prompt's images in order, `videos` its videos (each a list of frames or a (T, H, W, 3) array). In
        `input_ids` each becomes one `<image>` per view, and `pixel_values` holds the views in the text's order.

        Truncation never cuts an `<image>` whose image is given: such a call is refused (`ValueError`)."""
        if images is None and text is None and videos is None:
            raise ValueError("SaisaProcessor needs text, images, videos or a mix")
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
        flat = flatten_images(images)
        clips = [] if videos is None else list(videos) if isinstance(videos, (list, tuple)) else [videos]
        pending = {
            "image": iter([self.views(image) for image in flat]),
            "video": iter([self.views(clip, "video", merged["videos_kwargs"].get("num_frames")) for clip in clips]),
        }
        data, views = {}, []
        if text is None:
            views = [view for kind in ("image", "video") for item in pending[kind] for view in item]
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            for kind, token, given in (("image", self.image_token, len(flat)), ("video", self.video_token, len(clips))):
                held = sum(t.count(token) for t in texts)
                if held != given:
                    raise ValueError(f"the text holds {held} {token} placeholder(s) but {given} {kind}(s) were given")
            expanded = [self._expand(t, pending, views) for t in texts]
            texts, spans = [t for t, _ in expanded], [s for _, s in expanded]
            encoded = self.tokenizer(texts, **text_kwargs)
            self._refuse_cut_images(encoded["input_ids"], [t.count(self.image_token) for t in texts], text_kwargs)
            data = dict(encoded)
            if return_mm_types:  # 1 where an image goes (transformers' convention: 1 image, 2 video)
                data["mm_token_type_ids"] = [[int(t == self.image_token_id) for t in row] for row in data["input_ids"]]
            if return_offsets:
                data["text_replacement_offsets"] = spans
        if views:
            data["pixel_values"] = self.preprocess_images(views, **images_kwargs)
        return BatchFeature(data, tensor_type=return_tensors)

    def _expand(self, text: str, pending: dict, views: list) -> tuple[str, list[dict]]:
        """`text` with each `<image>` / `<video>` replaced by one `<image>` per view of the next pending item (whose
        views join `views`), and transformers' replacement offsets of each."""
        tokens = {self.image_token: "image", self.video_token: "video"}
        out, spans, length, new_length = [], [], 0, 0
        for piece in re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text):
            if piece in tokens:
                item = next(pending[tokens[piece]])
                views.extend(item)
                replacement = self.image_token * len(item)
                spans.append(
                    {
                        "type": tokens[piece],
                        "span": (length, length + len(piece)),
                        "new_span": (new_length, new_length + len(replacement)),
                        "replacement": replacement,
                    }
                )
                piece_out = replacement
            else:
                piece_out = piece
            out.append(piece_out)
            length, new_length = length + len(piece), new_length + len(piece_out)
        return "".join(out), spans

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
        """Placeholder tokens each image of (height, width) gets in the input ids: one `<image>` per view (the model
        expands each to its v visual positions)."""
        data = {}
        if image_sizes is not None:
            counts = [self.num_views((width, height)) for height, width in image_sizes]
            data = {"num_image_tokens": counts, "num_image_patches": counts}
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
        prompts, image_items, video_items = [], [], []
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
                        elif kind == "video":
                            parts.append(self.video_token + "\n")
                            video_items.append(item)
                        elif kind == "text":
                            parts.append(item["text"])
                        else:
                            raise ValueError(f"unknown content type {kind!r}; use 'text', 'image' or 'video'")
                    content = "".join(parts)
                rendered.append({**message, "content": content})
            prompts.append(
                self._render(rendered, chat_template, add_generation_prompt, continue_final_message, **kwargs)
            )
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [content_image(item, i) for i, item in enumerate(image_items)]
        videos = [content_video(item, i) for i, item in enumerate(video_items)]
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors
        text = prompts if batched else prompts[0]
        inputs = self(text=text, images=images or None, videos=videos or None, **processor_kwargs)
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
        from saisa.processing.templates import get_template

        return get_template(self.template).render(messages, add_generation_prompt=add_generation_prompt).text

    # -- persistence ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        files = super().save_pretrained(save_directory, **kwargs)
        from saisa.portable import AUTO_MODULE, add_auto_map

        add_auto_map(Path(save_directory) / PROCESSOR_NAME, {"AutoProcessor": f"{AUTO_MODULE}.{type(self).__name__}"})
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SaisaProcessor:
        """Folders written by `save_pretrained`, and folders holding a tokenizer and an image processor
        (`preprocessor_config.json`) but no processor of their own."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir() or (folder / PROCESSOR_NAME).exists():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_processor = checkpoint_image_processor(folder)
        if image_processor is None:
            raise FileNotFoundError(
                f"{folder} holds no {PROCESSOR_NAME} or {IMAGE_PROCESSOR_NAME}: "
                "not a folder written by SaisaProcessor.save_pretrained"
            )
        return cls(AutoTokenizer.from_pretrained(folder, **kwargs), image_processor)
