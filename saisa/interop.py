"""Checkpoints from elsewhere: the authors' SAISA releases and LLaVA-1.5 (original and llava-hf layouts) load into
`SaisaForConditionalGeneration`; our `llava` models export to the llava-hf layout.

Layouts (by their config.json and weight names):
- `saisa`: ours (`model_type: saisa`).
- `llava_original` (LLaVA code base, and the SAISA release built on it): `model_type: llava_llama`/`llava_mistral`,
  LLM at `model.*` + `lm_head`, CLIP at `model.vision_tower.vision_tower.*`, projector at `model.mm_projector.{0,2}`,
  and in SAISA releases one projector per layer at `model.layers.{i}.mm_projector.{0,2}`.
- `llava_hf` (transformers' `LlavaForConditionalGeneration`, v4 or v5 key names).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, PreTrainedConfig

from saisa.configuration_saisa import SaisaConfig

logger = logging.getLogger(__name__)

# Vision towers named by hub id in LLaVA configs (their weights travel inside the checkpoint; nothing is fetched).
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    ),
}
LAYER_PROJECTOR = re.compile(r"^model\.layers\.(\d+)\.mm_projector\.(0|2)\.(weight|bias)$")


class UnknownCheckpointError(ValueError):
    pass


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise UnknownCheckpointError(f"{folder}: no config.json, so this is not a model folder")
    return json.loads(path.read_text())


def detect_layout(folder: str | Path) -> str:
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type == "saisa":
        return "saisa"
    if model_type in ("llava_llama", "llava_mistral", "llava_qwen") or "mm_vision_tower" in config:
        return "llava_original"
    if model_type == "llava":
        return "llava_hf"
    raise UnknownCheckpointError(
        f"{folder}: unknown layout (model_type {model_type!r}); expected 'saisa', 'llava' (llava-hf) or "
        "'llava_llama' with mm_vision_tower (LLaVA-1.5 / SAISA releases)"
    )


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: safetensors (single or sharded) or PyTorch .bin shards (the LLaVA-1.5 releases)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UnknownCheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    state = {}
    for file in files:
        state.update(
            load_file(file)
            if file.suffix == ".safetensors"
            else torch.load(file, map_location="cpu", weights_only=True)
        )
    return state


def _vision_config(folder: Path, config: dict, state: dict) -> PreTrainedConfig:
    tower = config.get("mm_vision_tower")
    if tower is None:
        raise UnknownCheckpointError(f"{folder}: config.json has no mm_vision_tower")
    local = Path(tower) if Path(tower).is_absolute() else folder / tower
    if (local / "config.json").exists():
        vision = AutoConfig.from_pretrained(local)
        return getattr(vision, "vision_config", vision) if hasattr(vision, "text_config") else vision
    if tower in KNOWN_VISION_TOWERS:
        return CLIPVisionConfig(**KNOWN_VISION_TOWERS[tower])
    raise UnknownCheckpointError(
        f"{folder}: vision tower {tower!r} is neither a local folder with config.json nor one of "
        f"{sorted(KNOWN_VISION_TOWERS)}; point mm_vision_tower at a local CLIP/SigLIP folder"
    )


def _strip_vision_model(key: str) -> str:
    # transformers 5 dropped the `vision_model.` level of CLIPVisionModel / SiglipVisionModel
    return key.removeprefix("vision_model.")


def convert_llava_original(folder: str | Path, architecture: str | None = None):
    """(SaisaConfig, state dict in our layout) of a LLaVA-1.5 / SAISA-release folder.

    architecture: None keeps what the checkpoint is (saisa if it has per-layer projectors, else llava); "saisa" on a
    LLaVA checkpoint starts a SAISA model from its LLM and vision tower (projectors new: stage `align`).
    """
    folder = Path(folder)
    config, state = read_config(folder), read_weights(folder)
    has_layer_projectors = any(LAYER_PROJECTOR.match(k) for k in state)
    found = "saisa" if has_layer_projectors else "llava"
    architecture = architecture or found
    text_dict = {
        k: v
        for k, v in config.items()
        if not k.startswith("mm_")
        and k
        not in (
            "model_type",
            "architectures",
            "image_aspect_ratio",
            "tune_mm_mlp_adapter",
            "freeze_mm_mlp_adapter",
            "use_mm_proj",
            "image_grid_pinpoints",
            "tokenizer_model_max_length",
            "tokenizer_padding_side",
            "unfreeze_mm_vision_tower",
            "mm_projector_lr",
            "auto_map",
            "_name_or_path",
        )
    }
    base_type = {"llava_mistral": "mistral", "llava_qwen": "qwen2"}.get(config.get("model_type"), "llama")
    text_config = AutoConfig.for_model(base_type, **text_dict)
    vision_config = _vision_config(folder, config, state)
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise UnknownCheckpointError(
            f"{folder}: projector {config['mm_projector_type']!r} is not supported (mlp2x_gelu only)"
        )
    select = config.get("mm_vision_select_feature", "patch")
    saisa_config = SaisaConfig(
        text_config=text_config,
        vision_config=vision_config,
        architecture=architecture,
        image_token_id=_image_token_id(folder),
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
    )
    ours = {}
    for key, value in state.items():
        if match := LAYER_PROJECTOR.match(key):
            if architecture == "saisa" and has_layer_projectors:
                layer, index, kind = match.groups()
                ours[f"layer_projectors.{layer}.linear_{1 if index == '0' else 2}.{kind}"] = value
        elif key.startswith("model.mm_projector."):
            if architecture != "saisa":  # in SAISA releases it is vestigial (overwritten at layer 0)
                index, kind = key.removeprefix("model.mm_projector.").split(".")
                ours[f"projector.linear_{1 if index == '0' else 2}.{kind}"] = value
        elif key.startswith("model.vision_tower.vision_tower."):
            ours["vision_tower.model." + _strip_vision_model(key.removeprefix("model.vision_tower.vision_tower."))] = (
                value
            )
        elif key.startswith("model."):
            ours["language_model." + key] = value
        elif key == "lm_head.weight":
            ours["language_model.lm_head.weight"] = value
    return saisa_config, ours


def _image_token_id(folder: Path) -> int:
    """The id SaisaProcessor gives `<image>` with this folder's tokenizer (LLaVA itself used -200, outside any
    vocabulary, and spliced it in code)."""
    from saisa.processing import IMAGE_TOKEN

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return -200
    vocab = tokenizer.get_vocab()
    return vocab[IMAGE_TOKEN] if IMAGE_TOKEN in vocab else len(tokenizer)


_HF_PREFIXES = [  # (llava-hf prefix, ours), v5 names first
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.model."),
    ("vision_tower.", "vision_tower.model."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
]


_EXPORT_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # the Hub's llava-hf layout, which transformers loads and vLLM's LLaVA expects (transformers 5 saves the vision
    # tower without `vision_model.`, which vLLM cannot load)
    ("vision_tower.model.", "model.vision_tower.vision_model."),
    ("projector.", "model.multi_modal_projector."),
]


def convert_llava_hf(folder: str | Path, architecture: str | None = None):
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.projector_hidden_act != "gelu" or getattr(config, "vision_feature_layer", -2) is None:
        raise UnknownCheckpointError(f"{folder}: only the LLaVA-1.5 projector (2 linears, GELU) is supported")
    architecture = architecture or "llava"
    saisa_config = SaisaConfig(
        text_config=config.text_config,
        vision_config=config.vision_config,
        architecture=architecture,
        image_token_id=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_bias=getattr(config, "multimodal_projector_bias", True),
    )
    ours = {}
    for key, value in read_weights(folder).items():
        for theirs, mine in _HF_PREFIXES:
            if key.startswith(theirs):
                rest = key.removeprefix(theirs)
                if mine == "vision_tower.model.":
                    rest = _strip_vision_model(rest)
                if mine == "projector." and architecture == "saisa":
                    break  # a new SAISA model starts its projectors afresh
                ours[mine + rest] = value
                break
    return saisa_config, ours


def load_foreign(folder: str | Path, *, architecture: str | None = None, dtype: torch.dtype | None = None):
    """A `SaisaForConditionalGeneration` from a LLaVA-1.5 / SAISA-release / llava-hf folder."""
    from saisa.modeling import SaisaForConditionalGeneration
    from saisa.modeling.saisa_model import from_legacy_keys, to_legacy_keys

    layout = detect_layout(folder)
    convert = {"llava_original": convert_llava_original, "llava_hf": convert_llava_hf}.get(layout)
    if convert is None:
        raise UnknownCheckpointError(f"{folder} is already in saisa layout")
    config, state = convert(folder, architecture)
    model = SaisaForConditionalGeneration(config)
    expected = set(to_legacy_keys(model.state_dict()))  # the names our folders (and `state` here) use
    missing = expected - set(state)
    allowed = {"language_model.lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    if config.architecture == "saisa" and not any(k.startswith("layer_projectors") for k in state):
        allowed |= {k for k in missing if k.startswith(("layer_projectors.", "projector."))}  # new: stage align
    missing_real = sorted(missing - allowed)
    if missing_real:
        raise UnknownCheckpointError(
            f"{folder}: weights missing for {len(missing_real)} parameter(s), e.g. {missing_real[:3]}"
        )
    unexpected = sorted(set(state) - expected)
    if unexpected:
        logger.warning("%s: ignoring %d unknown tensor(s), e.g. %s", folder, len(unexpected), unexpected[:3])
    model.load_state_dict(from_legacy_keys({k: v for k, v in state.items() if k in expected}), strict=False)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def processor_for_foreign(folder: str | Path, model, *, template: str | None = None):
    """The tokenizer of the checkpoint folder with LLaVA-1.5 preprocessing; the conversation template the checkpoint
    was trained with (Vicuna v1 for Llama-2/Vicuna, the LLaVA Llama-3 template for Llama-3)."""
    from saisa.processing import SaisaProcessor, checkpoint_image_processor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template is None and detect_layout(folder) == "llava_original":
        template = "llama3" if "<|eot_id|>" in tokenizer.get_vocab() else "vicuna_v1"
    processor = SaisaProcessor(
        tokenizer, checkpoint_image_processor(folder, model.vision_tower.preprocessing), template=template
    )
    if processor.image_token_id != model.config.image_token_id:
        model.config.image_token_id = processor.image_token_id
    return processor


def export_llava_hf(model, folder: str | Path, processor=None) -> None:
    """Write an `architecture="llava"` model in transformers' llava-hf layout (LlavaForConditionalGeneration) and, given
    its `SaisaProcessor`, the `LlavaProcessor` that feeds it the same inputs: LLaVA-1.5's pad to square
    (`LlavaImageProcessor(do_pad=True)`), the same chat template (written for transformers' message format), each
    `<image>` expanded to the model's v tokens. Plain transformers (`LlavaForConditionalGeneration`, `AutoProcessor`,
    `pipeline("image-text-to-text")`) then opens the folder and answers as our model does.

    An `<image>` id outside the LLM's vocabulary (where SaisaProcessor adds it) gets a zero embedding and LM-head row,
    never generated (`suppress_tokens`): llava-hf looks the image token up in the embedding table."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlavaConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

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
    from saisa.modeling.saisa_model import to_legacy_keys

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
    from transformers import LlavaImageProcessorPil, LlavaProcessor

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
    from saisa.data.templates import Template, get_template
    from saisa.processing import _content_is_list

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
