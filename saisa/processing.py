"""`SaisaProcessor`: tokenizer + LLaVA-1.5 image preprocessing (pad to square, resize, normalise).

`input_ids` carry one `<image>` token per image; the model expands it to v positions itself.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from saisa.vision import ImagePreprocessing

IMAGE_TOKEN = "<image>"
PROCESSOR_FILE = "saisa_processor.json"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, with an error that names the file."""
    try:
        with warnings.catch_warnings():
            # PIL only warns up to twice MAX_IMAGE_PIXELS: a possible decompression bomb is refused either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"refusing image {path}: {error} (raise PIL.Image.MAX_IMAGE_PIXELS if genuine)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from None


def _flatten_images(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    flat = []
    for item in images:
        flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in flat]


class SaisaProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, preprocessing: ImagePreprocessing, *,
                 image_token: str = IMAGE_TOKEN, chat_template: str | None = None, template: str | None = None):
        """template: a named conversation template (`saisa.data.templates`: vicuna_v1, llama3, chatml) used instead
        of the tokenizer's chat template, as checkpoints trained with one expect."""
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([image_token], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.image_token = image_token
        self.template = template

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    # -- images --------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, S, S): pad to square with the mean colour (LLaVA-1.5), resize, normalise."""
        p = self.preprocessing
        mean = np.array(p.image_mean, dtype=np.float32)
        std = np.array(p.image_std, dtype=np.float32)
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
            image = image.convert("RGB")
            side = max(image.size)
            square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in p.image_mean))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            resized = square.resize((p.image_size, p.image_size), Image.Resampling.BICUBIC)
            array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std  # (S, S, 3)
            out.append(torch.from_numpy(array).permute(2, 0, 1))
        return torch.stack(out) if out else torch.zeros(0, 3, p.image_size, p.image_size)

    # -- text ----------------------------------------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str], images=None, *, padding_side: str = "left",
                 return_tensors: str = "pt", add_special_tokens: bool = False) -> BatchFeature:
        """Tokenise prompts holding `<image>` once per image; `images` are every prompt's images in order."""
        texts = [text] if isinstance(text, str) else list(text)
        flat = _flatten_images(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat):
            raise ValueError(
                f"the text holds {placeholders} {self.image_token} placeholder(s) but {len(flat)} image(s) were given"
            )
        self.tokenizer.padding_side = padding_side
        encoded = self.tokenizer(texts, padding=True, return_tensors=return_tensors,
                                 add_special_tokens=add_special_tokens)
        data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return BatchFeature(data)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str:
        """Messages whose content is a string or a list of `{"type": "text", "text": ...}` / `{"type": "image"}`."""
        rendered = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                parts = []
                for item in content:
                    kind = item.get("type")
                    if kind == "image":
                        parts.append(self.image_token + "\n")
                    elif kind == "text":
                        parts.append(item["text"])
                    else:
                        raise ValueError(f"unknown content type {kind!r}; use 'text' or 'image'")
                content = "".join(parts)
            rendered.append({**message, "content": content})
        if self.template is not None:
            from saisa.data.templates import get_template

            return get_template(self.template).render(rendered, add_generation_prompt=add_generation_prompt).text
        return self.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # -- persistence ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        p = self.preprocessing
        settings = {"image_token": self.image_token, "image_size": p.image_size, "image_mean": list(p.image_mean),
                    "image_std": list(p.image_std), "template": self.template}
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SaisaProcessor":
        directory = Path(directory)
        path = directory / PROCESSOR_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a folder written by SaisaProcessor.save_pretrained")
        settings = json.loads(path.read_text())
        preprocessing = ImagePreprocessing(settings["image_size"], tuple(settings["image_mean"]),
                                           tuple(settings["image_std"]))
        return cls(AutoTokenizer.from_pretrained(directory), preprocessing, image_token=settings["image_token"],
                   template=settings.get("template"))
