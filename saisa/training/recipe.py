"""Recipes: a YAML file (see `recipes/`) with `key.sub=value` overrides from the command line, run as one stage."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import re
from functools import partial
from pathlib import Path

import torch
import yaml

from saisa.training.stages import STAGES, LoraSettings, configure_stage, expand_shared_projector, trainable_summary

logger = logging.getLogger(__name__)

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
DATA_KEYS = {"train", "image_folder", "template", "max_length", "skip_bad_images", "allow_external_images"}
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


def _require(recipe: dict, dotted: str):
    node = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"recipe is missing `{dotted}`")
        node = node[part]
    return node


def build_model_and_processor(model_spec: dict, architecture: str):
    """`init`: "embedded" | a saved model folder; or `llm` + `vision`: local transformers checkpoints."""
    from saisa import SaisaForConditionalGeneration
    from saisa.processing import SaisaProcessor, checkpoint_image_processor

    extra = {k: model_spec[k] for k in ("shared_projector",) if k in model_spec}
    init = model_spec.get("init")
    if init == "embedded":
        from saisa.embedded import build_embedded_default

        return build_embedded_default(architecture, image_size=model_spec.get("image_size", 224), **extra)
    if init:  # ours, or a LLaVA-1.5 / llava-hf / SAISA-release folder converted on load
        from saisa.loading import load_pretrained

        model, processor = load_pretrained(init, device="cpu", dtype=torch.float32, architecture=architecture)
        if model.config.architecture != architecture:
            raise ValueError(f"{init} holds a {model.config.architecture!r} model but the recipe says {architecture!r}")
        return model, processor
    if "llm" in model_spec and "vision" in model_spec:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from saisa.vision.clip import load_vision_model

        llm = AutoModelForCausalLM.from_pretrained(model_spec["llm"], dtype=torch.float32)
        vision = load_vision_model(model_spec["vision"])
        model = SaisaForConditionalGeneration.from_modules(llm, vision, architecture=architecture, **extra)
        processor = SaisaProcessor(
            AutoTokenizer.from_pretrained(model_spec["llm"]),
            checkpoint_image_processor(model_spec["vision"], model.vision_tower.preprocessing),
            template=model_spec.get("template"),
        )
        model.config.image_token_id = processor.image_token_id
        return model, processor
    raise ValueError("recipe `model` needs `init: embedded`, `init: <saved model folder>`, or `llm:` and `vision:`")


def _attach_feature_cache(model, directory: str, settings: dict) -> None:
    """`model.feature_cache: DIR`: the frozen encoder's features are computed once per image and read back after."""
    from saisa.vision.feature_cache import VisionFeatureCache

    zero = (settings.get("deepspeed") or {}).get("zero_optimization", {}).get("stage", 0)
    if settings.get("fsdp") or zero == 3:
        raise ValueError(
            "model.feature_cache cannot be used with FSDP or ZeRO-3: the encoder is sharded there and every rank must "
            "run it in step with the others; use DDP or ZeRO-2, or drop model.feature_cache"
        )
    model.vision_feature_cache = VisionFeatureCache(directory)


def run_training(recipe: dict, *, resume: bool | str = False, callbacks: list | None = None) -> Path:
    """Train one stage; writes checkpoints, then the final `from_pretrained` folder (model + processor + loss.png).

    resume: False; True or "full" (from the newest checkpoint that verifies, with its optimizer, scheduler and RNG
    states); "weights-only" (its weights and step, a fresh optimizer).
    """
    from transformers import TrainingArguments, set_seed

    from saisa.compat import training_arguments
    from saisa.data import Collator, LlavaJsonDataset
    from saisa.modeling.saisa_model import loss_labels
    from saisa.training import engines
    from saisa.training.trainer import (
        RESUME_MODES,
        LossCurveCallback,
        NonFiniteGuard,
        SaisaTrainer,
        ThroughputCallback,
        disk_errors,
    )

    resume_mode = "full" if resume is True else resume or None
    if resume_mode is not None and resume_mode not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES} (or True/False), got {resume!r}")
    recipe = copy.deepcopy(recipe)
    stage = recipe.get("stage", "align")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    architecture = recipe.get("architecture", "saisa")
    output_dir = Path(_require(recipe, "output_dir"))
    data = _require(recipe, "data")
    # Seed before anything random is built (new projectors, LoRA matrices), not only when the Trainer starts.
    set_seed(recipe.get("training", {}).get("seed", TRAINING_DEFAULTS["seed"]))
    model, processor = build_model_and_processor(_require(recipe, "model"), architecture)
    if stage == "instruct" and recipe.get("expand_shared_projector", True) and expand_shared_projector(model):
        logger.info("initialised %d per-layer projectors from the shared one", len(model.layer_projectors))

    dataset = LlavaJsonDataset(
        _require(data, "train"),
        data.get("image_folder"),
        processor,
        template=data.get("template", STAGE_DEFAULTS[stage]["template"]),
        tokens_per_image=model.tokens_per_image,
        max_length=data.get("max_length", 2048),
        skip_bad_images=data.get("skip_bad_images", False),
        allow_external_images=data.get("allow_external_images", False),
    )
    lora = LoraSettings(**recipe.get("lora", {}))
    trainable = configure_stage(model, stage, freeze_llm=recipe.get("freeze_llm", False), lora=lora)
    print(f"stage {stage} ({architecture}): {trainable_summary(trainable)}; {len(dataset)} samples")

    settings = {
        **TRAINING_DEFAULTS,
        "learning_rate": STAGE_DEFAULTS[stage]["learning_rate"],
        **recipe.get("training", {}),
    }
    on_gpu = torch.cuda.is_available()
    settings.setdefault("bf16", on_gpu and torch.cuda.is_bf16_supported())
    nonfinite_patience = settings.pop("nonfinite_patience", 0)
    if settings.pop("group_by_length", True):
        settings.setdefault("train_sampling_strategy", "group_by_length")
    if settings.get("deepspeed"):
        settings["deepspeed"] = engines.deepspeed_config(settings["deepspeed"], on_gpu=on_gpu)
    if settings.get("fsdp"):
        settings["fsdp_config"] = engines.fsdp_config_for(model, settings.get("fsdp_config"))
    if _require(recipe, "model").get("feature_cache"):
        _attach_feature_cache(model, recipe["model"]["feature_cache"], settings)
    if settings.get("activation_checkpointing"):
        # non-reentrant: with a frozen LLM the checkpointed layers' inputs need no grad, yet projector grads must flow
        settings.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    args = TrainingArguments(
        output_dir=str(output_dir), remove_unused_columns=False, use_cpu=not on_gpu, **training_arguments(settings)
    )
    trainer = SaisaTrainer(
        model=trainable,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(
            processor.tokenizer.pad_token_id,
            partial(loss_labels, image_token_id=model.config.image_token_id, architecture=model.config.architecture),
        ),
        lengths=dataset.lengths,
        callbacks=[ThroughputCallback(), LossCurveCallback(), *(callbacks or [])],
    )
    guard = NonFiniteGuard(trainer, nonfinite_patience)
    trainer.add_callback(guard)
    engines.enable_fsdp_on_cpu(trainer)
    if trainer.is_world_process_zero():
        print(f"engine: {engines.describe_engine(trainer)}")
    if lora.r > 0:
        engines.check_lora_supported(trainer)
    checkpoint = None
    if resume_mode is not None:
        if resume_mode == "weights-only" and trainer.is_deepspeed_enabled:
            raise ValueError("--resume weights-only is not supported with DeepSpeed (it loads its states together)")
        checkpoint = _checkpoint_to_resume(trainer, output_dir, resume_mode)
        trainer.fresh_training_state = resume_mode == "weights-only"
        if checkpoint is None:
            print(f"no checkpoint in {output_dir}: starting afresh")
        else:
            fresh = " (weights only: a fresh optimizer and RNG)" if trainer.fresh_training_state else ""
            print(f"resuming from {checkpoint}{fresh}")
    trainer.train(resume_from_checkpoint=checkpoint)
    if (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):  # every rank's skipped/truncated samples
        torch.distributed.all_reduce(dataset.stats.flags, op=torch.distributed.ReduceOp.MAX)

    with disk_errors(output_dir, remove_on_failure=False):
        engines.save_final(trainer, output_dir, lora=lora.r > 0)
    if trainer.args.should_save:
        processor.save_pretrained(output_dir)
        report = {
            "stage": stage,
            "architecture": architecture,
            "samples": len(dataset),
            "trainable_parameters": sum(p.numel() for p in trainable.parameters() if p.requires_grad),
            "truncated_samples": dataset.stats.truncated,
            "skipped_samples": dataset.stats.skipped,
            "nonfinite_steps_skipped": guard.skipped_steps,
            "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
            "losses": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        }
        if model.vision_feature_cache is not None:
            cache = model.vision_feature_cache
            report["feature_cache"] = {"directory": str(cache.directory), "hits": cache.hits, "misses": cache.misses}
        (output_dir / "training_report.json").write_text(json.dumps(report, indent=2))
        print(
            f"truncated {dataset.stats.truncated} sample(s) to {dataset.max_length} positions; "
            f"skipped {dataset.stats.skipped} sample(s) with a bad image or a broken record"
        )
        print(f"saved the trained model and its processor to {output_dir}")
    return output_dir


def _checkpoint_to_resume(trainer, output_dir: Path, mode: str) -> str | None:
    """The first process verifies the checkpoints in full (hashing them once, not once per rank) and tells the
    others; every rank then checks the chosen one's files cheaply (present, sizes) where it will load them, which
    catches a node whose copy differs. A refusal is raised on every rank, so none waits for the rest."""
    from saisa.training.trainer import CheckpointError, checkpoint_problem, last_good_checkpoint

    outcome = [None]
    if trainer.args.process_index == 0:
        try:
            found = last_good_checkpoint(output_dir, mode)
            outcome = [("ok", None if found is None else str(found))]
        except CheckpointError as error:
            outcome = [("refused", str(error))]
    distributed = trainer.args.world_size > 1
    if distributed:
        torch.distributed.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "refused":
        raise CheckpointError(value)
    if value is None or not distributed:
        return value
    local = checkpoint_problem(Path(value), full=False, weights_only=mode == "weights-only")
    problems = [None] * trainer.args.world_size
    torch.distributed.all_gather_object(problems, local)
    found = [f"rank {rank}: {problem}" for rank, problem in enumerate(problems) if problem is not None]
    if found:
        raise CheckpointError(f"{value} verified on rank 0 but not where other ranks load it:\n  " + "\n  ".join(found))
    return value
