"""One training stage run from a recipe (`load_recipe`): the model and processor it names, the dataset, the engine,
resuming, the final folder and its report."""

from __future__ import annotations

import copy
import json
import logging
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

from saisa.checkpoints.assembly import from_parts
from saisa.checkpoints.loading import load_pretrained
from saisa.compat import training_arguments
from saisa.components.encoders.clip import load_vision_model
from saisa.embedded import build_embedded_default
from saisa.model.feature_cache import VisionFeatureCache
from saisa.model.modeling import loss_labels
from saisa.processing.views import NUM_FRAMES, anyres_grid_pinpoints
from saisa.training import engines
from saisa.training.data import Collator, LlavaJsonDataset
from saisa.training.recipe import STAGE_DEFAULTS, TRAINING_DEFAULTS
from saisa.training.stages import STAGES, LoraSettings, configure_stage, expand_shared_projector, trainable_summary
from saisa.training.trainer import (
    RESUME_MODES,
    CheckpointError,
    LossCurveCallback,
    NonFiniteGuard,
    SaisaTrainer,
    ThroughputCallback,
    checkpoint_problem,
    disk_errors,
    last_good_checkpoint,
)

logger = logging.getLogger(__name__)


def _require(recipe: dict, dotted: str):
    node = recipe
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"recipe is missing `{dotted}`")
        node = node[part]
    return node


def build_model_and_processor(model_spec: dict, architecture: str):
    """`init`: "embedded" | a saved model folder; or `llm` + `vision`: local transformers checkpoints."""
    extra = {k: model_spec[k] for k in ("shared_projector",) if k in model_spec}
    init = model_spec.get("init")
    if init == "embedded":
        return build_embedded_default(architecture, image_size=model_spec.get("image_size", 224), **extra)
    if init:  # ours, or a LLaVA-1.5 / llava-hf / SAISA-release folder converted on load
        model, processor = load_pretrained(init, device="cpu", dtype=torch.float32, architecture=architecture)
        if model.config.architecture != architecture:
            raise ValueError(f"{init} holds a {model.config.architecture!r} model but the recipe says {architecture!r}")
        return model, processor
    if "llm" in model_spec and "vision" in model_spec:
        return from_parts(
            AutoModelForCausalLM.from_pretrained(model_spec["llm"], dtype=torch.float32),
            AutoTokenizer.from_pretrained(model_spec["llm"]),
            load_vision_model(model_spec["vision"]),
            images_from=model_spec["vision"],
            template=model_spec.get("template"),
            architecture=architecture,
            **extra,
        )
    raise ValueError("recipe `model` needs `init: embedded`, `init: <saved model folder>`, or `llm:` and `vision:`")


def _attach_feature_cache(model, directory: str, settings: dict) -> None:
    """`model.feature_cache: DIR`: the frozen encoder's features are computed once per image and read back after."""
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

    if data.get("max_tiles"):  # AnyRes tiling; the processor saved with the model carries it to inference
        processor.image_grid_pinpoints = anyres_grid_pinpoints(processor.preprocessing.image_size, data["max_tiles"])
    dataset = LlavaJsonDataset(
        _require(data, "train"),
        data.get("image_folder"),
        processor,
        template=data.get("template", STAGE_DEFAULTS[stage]["template"]),
        tokens_per_image=model.tokens_per_image,
        max_length=data.get("max_length", 2048),
        skip_bad_images=data.get("skip_bad_images", False),
        allow_external_images=data.get("allow_external_images", False),
        num_frames=data.get("num_frames", NUM_FRAMES),
    )
    lora = LoraSettings(**recipe.get("lora", {}))
    trainable = configure_stage(model, stage, freeze_llm=recipe.get("freeze_llm", False), lora=lora)
    logger.info("stage %s (%s): %s; %d samples", stage, architecture, trainable_summary(trainable), len(dataset))

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
        logger.info("engine: %s", engines.describe_engine(trainer))
    if lora.r > 0:
        engines.check_lora_supported(trainer)
    checkpoint = None
    if resume_mode is not None:
        if resume_mode == "weights-only" and trainer.is_deepspeed_enabled:
            raise ValueError("--resume weights-only is not supported with DeepSpeed (it loads its states together)")
        checkpoint = _checkpoint_to_resume(trainer, output_dir, resume_mode)
        trainer.fresh_training_state = resume_mode == "weights-only"
        if checkpoint is None:
            logger.info("no checkpoint in %s: starting afresh", output_dir)
        else:
            fresh = " (weights only: a fresh optimizer and RNG)" if trainer.fresh_training_state else ""
            logger.info("resuming from %s%s", checkpoint, fresh)
    trainer.train(resume_from_checkpoint=checkpoint)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's skipped/truncated
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
        logger.info(
            "truncated %d sample(s) to %d positions; skipped %d sample(s) with a bad image or a broken record",
            dataset.stats.truncated,
            dataset.max_length,
            dataset.stats.skipped,
        )
        logger.info("saved the trained model and its processor to %s", output_dir)
    return output_dir


def _checkpoint_to_resume(trainer, output_dir: Path, mode: str) -> str | None:
    """The first process verifies the checkpoints in full (hashing them once, not once per rank) and tells the
    others; every rank then checks the chosen one's files cheaply (present, sizes) where it will load them, which
    catches a node whose copy differs. A refusal is raised on every rank, so none waits for the rest."""
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
