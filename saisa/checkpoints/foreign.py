"""Checkpoints from elsewhere into ours: the authors' SAISA releases and LLaVA-1.5 (original and llava-hf layouts)
become a `SaisaForConditionalGeneration` and its processor. (Out to llava-hf: `export_llava_hf`.)

Layouts (by their config.json and weight names):
- `saisa`: ours (`model_type: saisa`).
- `llava_original` (LLaVA code base, and the SAISA release built on it): `model_type: llava_llama`/`llava_mistral`,
  LLM at `model.*` + `lm_head`, CLIP at `model.vision_tower.vision_tower.*`, projector at `model.mm_projector.{0,2}`,
  and in SAISA releases one projector per layer at `model.layers.{i}.mm_projector.{0,2}`.
- `llava_hf` (transformers' `LlavaForConditionalGeneration`, v4 or v5 key names).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, PreTrainedConfig

from saisa.checkpoints.assembly import with_processor
from saisa.model import SaisaForConditionalGeneration
from saisa.model.configuration import SaisaConfig
from saisa.model.modeling import from_legacy_keys, to_legacy_keys
from saisa.processing import IMAGE_TOKEN

logger = logging.getLogger(__name__)

# Vision towers named by hub id in LLaVA configs (their weights travel inside the checkpoint; nothing is fetched).
_CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
)
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(_CLIP_VIT_L14, image_size=336),
    "openai/clip-vit-large-patch14": dict(_CLIP_VIT_L14, image_size=224),
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
    # transformers 5's CLIPVisionModel / SiglipVisionModel hold their layers without the `vision_model.` level
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
            if saisa_config.arch.per_layer_projectors and has_layer_projectors:
                layer, index, kind = match.groups()
                ours[f"layer_projectors.{layer}.linear_{1 if index == '0' else 2}.{kind}"] = value
        elif key.startswith("model.mm_projector."):
            if not saisa_config.arch.per_layer_projectors:  # in SAISA releases it is vestigial (overwritten at layer 0)
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
                if mine == "projector." and saisa_config.arch.per_layer_projectors:
                    break  # a new SAISA model starts its projectors afresh
                ours[mine + rest] = value
                break
    return saisa_config, ours


def load_foreign(folder: str | Path, *, architecture: str | None = None, dtype: torch.dtype | None = None):
    """A `SaisaForConditionalGeneration` from a LLaVA-1.5 / SAISA-release / llava-hf folder."""
    layout = detect_layout(folder)
    convert = {"llava_original": convert_llava_original, "llava_hf": convert_llava_hf}.get(layout)
    if convert is None:
        raise UnknownCheckpointError(f"{folder} is already in saisa layout")
    config, state = convert(folder, architecture)
    model = SaisaForConditionalGeneration(config)
    expected = set(to_legacy_keys(model.state_dict()))  # the names our folders (and `state` here) use
    missing = expected - set(state)
    allowed = {"language_model.lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    if config.arch.per_layer_projectors and not any(k.startswith("layer_projectors") for k in state):
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
    """The tokenizer of the checkpoint folder with LLaVA-1.5 preprocessing, paired with `model`; the conversation
    template the checkpoint was trained with (Vicuna v1 for Llama-2/Vicuna, the LLaVA Llama-3 template for Llama-3)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template is None and detect_layout(folder) == "llava_original":
        template = "llama3" if "<|eot_id|>" in tokenizer.get_vocab() else "vicuna_v1"
    return with_processor(model, tokenizer, images_from=folder, template=template)[1]


def convert_folder(
    source: str | Path, destination: str | Path, *, architecture: str | None = None, template: str | None = None
):
    """`saisa convert`: a foreign folder written once in our layout (model + processor); returns (layout, model,
    processor) for the report."""
    layout = detect_layout(source)
    model = load_foreign(source, architecture=architecture)
    processor = processor_for_foreign(source, model, template=template)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    return layout, model, processor
