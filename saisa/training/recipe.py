"""Recipes: a YAML file (see `recipes/`) with `key.sub=value` overrides from the command line, read and checked into
the dict `run_training` runs as one stage."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

import yaml

from saisa.training.stages import LoraSettings

# LLaVA-1.5's recipe (SAISA.md §5); per-device batch and accumulation are the user's to fit their hardware.
STAGE_DEFAULTS = {
    "align": {"learning_rate": 1e-3, "template": "plain"},
    "instruct": {"learning_rate": 2e-5, "template": "vicuna_v1"},
}
TRAINING_DEFAULTS = {
    "num_train_epochs": 1,
    "warmup_steps": 0.03,  # < 1: a ratio of all steps
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
    "seed": 42,
    "activation_checkpointing": False,
    "dataloader_num_workers": 0,
    "report_to": "none",
}


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path, or the name of a recipe shipped in saisa/recipes (e.g. `vicuna7b-clip336-align`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(names)})")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-4` and `1E5` as floats: YAML 1.1 wants a dot (`2.0e-4`), else a string."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)

# Every key a recipe may hold, per section; `training` also takes every TrainingArguments field (`recipe_keys`).
TOP_LEVEL_KEYS = {
    "stage",
    "architecture",
    "output_dir",
    "model",
    "data",
    "lora",
    "training",
    "freeze_llm",
    "expand_shared_projector",
}
MODEL_KEYS = {"init", "llm", "vision", "image_size", "shared_projector", "template", "feature_cache"}
DATA_KEYS = {
    "train", "image_folder", "template", "max_length", "skip_bad_images", "allow_external_images", "max_tiles",
    "num_frames",
}  # fmt: skip
# Read by run_training itself; not TrainingArguments fields in every supported transformers release.
TRAINING_EXTRA_KEYS = {
    "group_by_length",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "nonfinite_patience",
}


def recipe_keys() -> dict[str, set[str]]:
    """Valid keys per section ("" = top level)."""
    from transformers import TrainingArguments

    training = {f.name for f in dataclasses.fields(TrainingArguments)} | set(TRAINING_DEFAULTS) | TRAINING_EXTRA_KEYS
    return {
        "": TOP_LEVEL_KEYS,
        "model": MODEL_KEYS,
        "data": DATA_KEYS,
        "lora": {f.name for f in dataclasses.fields(LoraSettings)},
        "training": training,
    }


def validate_recipe(recipe: dict) -> None:
    """Unknown keys are errors naming the nearest valid one: a typo would otherwise be silently ignored."""
    valid = recipe_keys()
    problems = _unknown_keys(recipe, valid[""], "")
    for section in ("model", "data", "lora", "training"):
        if section not in recipe:
            continue
        if not isinstance(recipe[section], dict):
            problems.append(f"recipe `{section}` must be a mapping of keys, got {recipe[section]!r}")
            continue
        problems += _unknown_keys(recipe[section], valid[section], f"{section}.")
    if problems:
        raise ValueError("\n".join(problems))


def _unknown_keys(node: dict, valid: set[str], prefix: str) -> list[str]:
    problems = []
    for key in node:
        if key in valid:
            continue
        nearest = difflib.get_close_matches(str(key), valid, n=1)
        if nearest:
            hint = f"did you mean `{prefix}{nearest[0]}`?"
        elif prefix == "training.":
            hint = f"`training` takes TrainingArguments fields and {', '.join(sorted(TRAINING_EXTRA_KEYS))}"
        else:
            hint = f"valid here: {', '.join(sorted(valid))}"
        problems.append(f"unknown recipe key `{prefix}{key}`; {hint}")
    return problems


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict:
    recipe = yaml.load(resolve_recipe(str(path)).read_text(), Loader=RecipeLoader) if path else {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = recipe
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: `{'.'.join(parents[: depth + 1])}` is {node!r}, not a mapping")
        node[leaf] = yaml.load(raw, Loader=RecipeLoader)
    validate_recipe(recipe)
    return recipe
