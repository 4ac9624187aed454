"""Our `llava` models out to transformers' llava-hf layout (`LlavaForConditionalGeneration` + `LlavaProcessor`), which
plain transformers and vLLM open and answer with as our model does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import GenerationConfig, LlavaConfig, LlavaImageProcessorPil, LlavaProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from saisa.checkpoints.loading import load_pretrained
from saisa.model.modeling import to_legacy_keys
from saisa.processing.processor import _content_is_list
from saisa.processing.templates import Template, get_template

_EXPORT_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # the Hub's llava-hf layout, which transformers loads and vLLM's LLaVA expects (transformers 5 saves the vision
    # tower without `vision_model.`, which vLLM cannot load)
    ("vision_tower.model.", "model.vision_tower.vision_model."),
    ("projector.", "model.multi_modal_projector."),
]


def export_llava_hf(model, folder: str | Path, processor=None) -> None:
    """Write an `architecture="llava"` model in transformers' llava-hf layout (LlavaForConditionalGeneration) and, given
    its `SaisaProcessor`, the `LlavaProcessor` that feeds it the same inputs: LLaVA-1.5's pad to square
    (`LlavaImageProcessor(do_pad=True)`), the same chat template (written for transformers' message format), each
    `<image>` expanded to the model's v tokens. Plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`,
    `pipeline("image-text-to-text")`) then opens the folder and answers as our model does.

    An `<image>` id outside the LLM's vocabulary (where SaisaProcessor adds it) gets a zero embedding and LM-head row,
    never generated (`suppress_tokens`): llava-hf looks the image token up in the embedding table."""
    if model.config.architecture != "llava":
        raise ValueError("only architecture='llava' models have a llava-hf equivalent")
    c = model.config
    if c.vision_config.model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"vision encoder {c.vision_config.model_type!r} is not a transformers model: llava-hf folders need one "
            "(CLIP or SigLIP)"
        )
    if c.image_token_id < 0:
        raise ValueError(f"image_token_id {c.image_token_id} is no token id; load the model with its tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_config = copy.deepcopy(c.text_config)
    extra_rows = max(0, c.image_token_id + 1 - text_config.vocab_size)
    text_config.vocab_size += extra_rows
    LlavaConfig(
        architectures=["LlavaForConditionalGeneration"],  # what vLLM picks its model class by
        vision_config=c.vision_config,
        text_config=text_config,
        image_token_index=c.image_token_id,
        image_seq_length=model.tokens_per_image,
        vision_feature_layer=c.vision_feature_layer,
        vision_feature_select_strategy=c.vision_feature_select_strategy,
        multimodal_projector_bias=c.projector_bias,
    ).save_pretrained(folder)
    state = {}
    for key, value in to_legacy_keys(model.state_dict()).items():
        for mine, theirs in _EXPORT_PREFIXES:
            if key.startswith(mine):
                state[theirs + key.removeprefix(mine)] = value.contiguous()
                break
    if c.text_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if extra_rows and key in state:
            rows = state[key].new_zeros(extra_rows, state[key].shape[1])
            state[key] = torch.cat([state[key], rows])  # (vocab + extra, d)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    generation = GenerationConfig.from_dict(model.generation_config.to_dict())
    generation.suppress_tokens = [c.image_token_id]  # our model never emits it (its LM head has no such row)
    generation.save_pretrained(folder)
    if processor is not None:
        _export_llava_processor(model, processor, folder)


_PIXEL_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def _export_llava_processor(model, processor, folder: Path) -> None:
    # every setting stated: LlavaImageProcessor's own defaults (e.g. a 224 centre crop) must not fill the gaps
    settings = {key: getattr(processor.image_processor, key, None) for key in _PIXEL_SETTINGS}
    settings = {key: value for key, value in settings.items() if value is not None}
    settings["do_center_crop"] = bool(settings.get("do_center_crop"))
    image_processor = LlavaImageProcessorPil(**settings, do_pad=processor.pad_to_square)
    vision = model.config.vision_config
    hf = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        chat_template=llava_hf_chat_template(processor),
        image_token=processor.image_token,
        num_additional_image_tokens=1 if vision.model_type == "clip_vision_model" else 0,  # CLIP's CLS token
    )
    side = processor.preprocessing.image_size
    expanded = hf(text=processor.image_token, images=[Image.new("RGB", (side, side))])["input_ids"][0]
    if expanded.count(processor.image_token_id) != model.tokens_per_image:
        raise ValueError(
            f"LlavaProcessor would give each image {expanded.count(processor.image_token_id)} tokens, the model "
            f"takes {model.tokens_per_image}"
        )
    hf.save_pretrained(folder)
    image_processor.save_pretrained(folder)  # preprocessor_config.json too, for readers of the older layout


def llava_hf_chat_template(processor) -> str:
    """A Jinja chat template for transformers' message format that renders as `processor.apply_chat_template` does:
    content lists flattened (an image item becomes `<image>` and a newline) for a template reading string content, a
    named template (vicuna_v1, llama3, chatml) written out in Jinja."""
    if processor.template is None:
        template = processor.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if template is None:
            raise ValueError("the processor has no chat template to export")
        return template if _content_is_list(template) else _flatten_prelude(processor.image_token) + template
    named = get_template(processor.template)
    if not isinstance(named, Template):
        raise ValueError(f"template {processor.template!r} has no chat-template equivalent")
    literal = json.dumps  # a JSON string is a Jinja string literal
    prefix = named.prefix.split("{system}")
    user_before, user_after = named.user.split("{content}")
    system = (
        f"{{{{ {literal(prefix[0])} }}}}{{{{ system }}}}{{{{ {literal(prefix[1])} }}}}"
        if len(prefix) == 2
        else (f"{{{{ {literal(named.prefix)} }}}}")
    )
    return _flatten_prelude(processor.image_token) + (
        f"{{%- set system = {literal(named.system)} -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}{%- endif -%}"
        f"{system}"
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{ {literal(user_before)} + message['content'] + "
        f"{literal(user_after)} }}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {literal(named.assistant_open)} + "
        f"{literal(named.separator)} + message['content'] + {literal(named.assistant_end)} }}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {literal(named.assistant_open)} }}}}{{%- endif -%}}"
    )


def _flatten_prelude(image_token: str) -> str:
    """Jinja that rewrites `messages` with content lists flattened to strings, as SaisaProcessor flattens them."""
    image = json.dumps(image_token + "\n")
    return (
        "{%- set flat = namespace(messages=[]) -%}{%- for message in messages -%}"
        "{%- if message['content'] is string or message['content'] is none -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set parts = namespace(text='') -%}{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{{%- set parts.text = parts.text + {image} -%}}"
        "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
        "{%- set flat.messages = flat.messages + [dict(message, content=text)] -%}"
        "{%- endfor -%}{%- set messages = flat.messages %}"
    )


def export_folder(source: str | Path, destination: str | Path) -> None:
    """`saisa convert --to llava-hf`: a saved `llava` model folder (any layout `load_pretrained` reads) -> llava-hf."""
    model, processor = load_pretrained(source, device="cpu", dtype=torch.float32)
    export_llava_hf(model, destination, processor)
