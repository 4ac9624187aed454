"""A small-scale replication of the paper's comparisons on real models (SmolLM2-135M-Instruct +
EfficientNet-Lite0) on real tasks (Fashion-MNIST naming, easy-VQA questions), fair by construction:

- the paper's training policy for all three architectures: `align` trains the projector(s) only, `instruct` the
  projector(s) and the whole LLM (no LoRA); the same data, steps and schedule for all;
- the instruct learning rate chosen per architecture on a validation split (questions on training-split images no
  training record uses), from the same grid for all three; the test split is read once per final model;
- several seeds (projector initialisation and data order) per architecture, each seed's figure kept, and a paired
  test on the same test questions (`saisa.experiments.significance`);
- a validation-accuracy-vs-step curve of every architecture's learning-rate runs, to show where training flattens;
- an efficiency curve at several numbers of visual tokens on the same real models, measured side by side.

The frozen encoder's features are computed once per image and reused by every stage, architecture and seed
(`saisa.model.feature_cache`). Finished runs are reused when the command is run again with the same settings.
Writes `reproduction.json` under `docs`, then `reproduction.md` and `reproduction.png` from it
(`saisa.experiments.report`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback

from saisa.bench.timing import interleaved, medians
from saisa.experiments.records import machine
from saisa.experiments.report import ARCHS, mean_std, write_report
from saisa.experiments.significance import paired_comparison
from saisa.training.recipe import TRAINING_DEFAULTS

logger = logging.getLogger(__name__)

# The paper's own figures (SAISA.md §4-5: Vicuna-7B + CLIP ViT-L/14-336, LCS-558K + LLaVA-665K), written into
# reproduction.json so that the report compares against them from the JSON alone.
PAPER = {
    "llm": "Vicuna-7B",
    "align_samples": 558_000,
    "instruct_samples": 665_000,
    "visual_tokens": 576,
    "text_tokens": 64,
    "prefill_flops_ratio": 0.34,
    "training_time_ratio": 0.74,
    "instruct_trainable_ratio": 1.09,
}
MODELS = {"llm": "SmolLM2-135M-Instruct", "vision": "EfficientNet-Lite0"}  # the embedded default's real models
TIMING_SAMPLES = 4  # test questions in a timed training step's batch


@dataclass(frozen=True)
class ReproduceSettings:
    """What `saisa reproduce` runs (its flags; the help text there says what each means)."""

    workdir: str = "runs/reproduce"
    docs: str = "docs"
    tasks: tuple[str, ...] = ("fashion-mnist", "easy-vqa")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    image_size: int = 224
    # The default sizes keep the whole default run within 150 min on 2 CPU cores (3 architectures x (5 seeds + 1 more
    # learning rate) instruct runs per task: Fashion-MNIST 55 steps after align runs of 35, 40 validation questions at 6
    # points of each learning-rate run, 100 test questions with and without the image per final model; easy-VQA 39
    # steps after 24, 39 and 104 questions); the measured wall time is in docs/reproduction.md.
    align_per_class: int = 14
    instruct_per_class: int = 22
    val_per_class: int = 4
    test_per_class: int = 10
    vqa_align_per_caption: int = 4
    vqa_instruct_per_answer: int = 12
    vqa_val_per_answer: int = 3
    vqa_test_per_answer: int = 8
    batch_size: int = 4
    align_lr: float = 1e-3
    instruct_lrs: tuple[float, ...] = (2e-5, 1e-4)
    curve_points: int = 5
    curve_image_sizes: tuple[int, ...] = (112, 224, 448)
    repeats: int = 7
    quick: bool = False
    report_only: bool = False
    curve_only: bool = False
    note: str | None = None
    keep_models: bool = False
    device: str | None = None
    dtype: str | None = None


# `--quick`: the first, smaller comparison (Fashion-MNIST alone, 3 seeds, 300 + 300 samples); under an hour.
QUICK = {
    "tasks": ("fashion-mnist",),
    "seeds": (0, 1, 2),
    "align_per_class": 30,
    "instruct_per_class": 30,
    "val_per_class": 10,
    "test_per_class": 20,
}


def effective(settings: ReproduceSettings) -> ReproduceSettings:
    """The settings a run uses: `quick` replaces the tasks, seeds and Fashion-MNIST sizes with `QUICK`'s."""
    return replace(settings, **QUICK, quick=False) if settings.quick else settings


@dataclass(frozen=True)
class Task:
    """A task of the comparison: how its data is written from the settings, and which settings size it."""

    name: str
    description: str  # what its images and text are, for the report
    size_keys: tuple[str, ...]
    prepare: Callable[[Path, ReproduceSettings], dict[str, Path]]


def _prepare_fashion_mnist(folder: Path, args: ReproduceSettings) -> dict[str, Path]:
    from saisa.experiments.fashion_mnist import CLASSES, keep_first_records, prepare

    data = prepare(
        folder,
        train_per_class=max(args.align_per_class, args.instruct_per_class),
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        seed=0,  # one data set for every seed: seeds vary initialisation and order, not the questions
    )
    keep_first_records(data["align"], args.align_per_class * len(CLASSES))
    keep_first_records(data["instruct"], args.instruct_per_class * len(CLASSES))
    return data


def _prepare_easy_vqa(folder: Path, args: ReproduceSettings) -> dict[str, Path]:
    from saisa.experiments.easy_vqa import prepare

    return prepare(
        folder,
        align_per_caption=args.vqa_align_per_caption,
        instruct_per_answer=args.vqa_instruct_per_answer,
        val_per_answer=args.vqa_val_per_answer,
        test_per_answer=args.vqa_test_per_answer,
        seed=0,
    )


TASKS = {
    task.name: task
    for task in (
        Task(
            "fashion-mnist",
            "Fashion-MNIST images with text made from their labels (name the item: 10 classes)",
            ("align_per_class", "instruct_per_class", "val_per_class", "test_per_class"),
            _prepare_fashion_mnist,
        ),
        Task(
            "easy-vqa",
            "easy-VQA's images and questions (yes/no, shape and colour: 13 answers), align captions made from their "
            "answers",
            ("vqa_align_per_caption", "vqa_instruct_per_answer", "vqa_val_per_answer", "vqa_test_per_answer"),
            _prepare_easy_vqa,
        ),
    )
}


def reproduce(settings: ReproduceSettings) -> str:
    """Run the comparison (or only its efficiency curve), write reproduction.json under `settings.docs`, then the
    report from it; with `report_only`, the report from the JSON already there. Returns the markdown."""
    docs = Path(settings.docs)
    if settings.report_only:
        return write_report(json.loads((docs / "reproduction.json").read_text()), docs)
    settings = effective(settings)
    unknown = set(settings.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}: the tasks are {', '.join(TASKS)}")
    start = time.perf_counter()
    tasks = {} if settings.curve_only else {name: train_and_evaluate(settings, TASKS[name]) for name in settings.tasks}
    from saisa.experiments.fashion_mnist import prepare

    # the timed prompts: a few Fashion-MNIST test questions, whichever tasks ran
    test = prepare(Path(settings.workdir) / "timing-data", train_per_class=1, test_per_class=1)["test"]
    curve = efficiency_curve(settings.curve_image_sizes, test, settings.repeats, device=settings.device)
    result = {
        "tasks": tasks,
        "efficiency_curve": curve,
        "command": "saisa reproduce "
        + ("--curve-only " if settings.curve_only else "")
        + " ".join(_settings_argv(settings)),
        "wall_time_s": time.perf_counter() - start,
        "machine": machine(),
        "note": settings.note,
        "setup": {
            **MODELS,
            "device": str(settings.device or "cpu"),
            "dtype": settings.dtype or "float32",
            "timing_samples": TIMING_SAMPLES,
            "timing_repeats": settings.repeats,
        },
        "paper": PAPER,
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "reproduction.json").write_text(json.dumps(result, indent=2))
    return write_report(result, docs)


# -- training and evaluation ----------------------------------------------------------------------------------------
def train_and_evaluate(args: ReproduceSettings, task: Task) -> dict:
    """One task's comparison: the learning-rate sweep at the first seed (with its validation curves), then every seed
    at each architecture's chosen rate on the test split, and the paired test of each architecture against LLaVA."""
    work = Path(args.workdir) / task.name
    data = task.prepare(work / "data", args)
    runner = Runs(work, data, args, task)
    per_arch = {}
    for arch in ARCHS:  # seed 0 of every architecture first: a partial run already compares all three
        per_arch[arch] = {"learning_rate_sweep": runner.sweep(arch, args.seeds[0])}
    correct = {}
    for arch in ARCHS:
        sweep = per_arch[arch]["learning_rate_sweep"]
        lr = max(sweep, key=lambda row: row["val_accuracy"])["learning_rate"]  # the first of equals: grid order
        runs = [runner.final(arch, seed, lr) for seed in args.seeds]
        correct[arch] = [run["correct"] for run in runs]
        accuracies = [r["accuracy"] for r in runs]
        mean, std = mean_std(accuracies)
        per_arch[arch].update(
            instruct_learning_rate=lr,
            accuracy_per_seed=accuracies,
            accuracy_mean=mean,
            accuracy_std=std,
            blind_accuracy_per_seed=[r["blind_accuracy"] for r in runs],
            train_time_s_per_seed=[r["align_s"] + r["instruct_s"] for r in runs],
            trainable_parameters={"align": runs[0]["align_trainable"], "instruct": runs[0]["instruct_trainable"]},
        )
    if not args.keep_models:
        runner.remove_models()
    records = {stage: len(json.loads(data[stage].read_text())) for stage in ("align", "instruct")}
    questions = {split: data[split].read_text().count("\n") for split in ("val", "test")}
    return {
        "description": task.description,
        "visual_tokens": runs[0]["visual_tokens"],
        "seeds": list(args.seeds),
        "architectures": per_arch,
        "significance": {
            f"{arch}_vs_llava": paired_comparison(correct[arch], correct["llava"]) for arch in ARCHS if arch != "llava"
        },
        "policy": {"align": "projector(s) only", "instruct": "projector(s) + the whole LLM"},
        "data": {
            "align_samples": records["align"],
            "instruct_samples": records["instruct"],
            "align_steps": math.ceil(records["align"] / args.batch_size),
            "instruct_steps": math.ceil(records["instruct"] / args.batch_size),
            "val_questions": questions["val"],
            "test_questions": questions["test"],
            "batch_size": args.batch_size,
            "align_learning_rate": args.align_lr,
            "instruct_learning_rate_grid": list(args.instruct_lrs),
            "lr_scheduler": TRAINING_DEFAULTS["lr_scheduler_type"],
            "warmup_ratio": TRAINING_DEFAULTS["warmup_steps"],
            **{split: str(path) for split, path in data.items()},
        },
    }


class Runs:
    """Every training stage and evaluation of the reproduction, each written to `workdir/results/` when it finishes and
    reused from there when the same run (same settings) is asked for again."""

    def __init__(self, work: Path, data: dict[str, Path], args: ReproduceSettings, task: Task):
        self.work, self.data, self.args = work, data, args
        self.features = work.parent / "features"  # keyed by pixels and encoder: one cache serves every task
        self.results = work / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.settings = _run_key(args, task)

    def sweep(self, arch: str, seed: int) -> list[dict]:
        """Instruct at every grid learning rate from this seed's align stage; accuracy on the validation split, at
        evenly spaced steps (the curve) and at the end."""
        rows = []
        for lr in self.args.instruct_lrs:
            run = self._run(arch, seed, lr, split="val")
            rows.append({"learning_rate": lr, "val_accuracy": run["accuracy"], "validation_curve": run["curve"]})
        return rows

    def final(self, arch: str, seed: int, lr: float) -> dict:
        return self._run(arch, seed, lr, split="test")

    def trained(self, arch: str, seed: int, lr: float) -> Path:
        """The folder of a model trained through both stages (align, then instruct at `lr`), reused when complete."""
        align, *_ = self._stage(arch, seed, "align", self.args.align_lr, init="embedded")
        return self._stage(arch, seed, "instruct", lr, init=str(align))[0]

    def _run(self, arch: str, seed: int, lr: float, *, split: str) -> dict:
        name = f"{arch}-seed{seed}-lr{lr:g}-{split}"
        path = self.results / f"{name}.json"
        if (finished := self._finished(path)) is not None:
            logger.info("reproduce: reusing %s", path)
            return finished
        align_dir, align_s, align_trainable, _ = self._stage(arch, seed, "align", self.args.align_lr, init="embedded")
        instruct_dir, instruct_s, instruct_trainable, curve = self._stage(
            arch, seed, "instruct", lr, init=str(align_dir), curve=split == "val"
        )
        if split == "val":  # the curve's last point is the trained model's validation accuracy
            scores = {"accuracy": curve[-1]["accuracy"], "curve": curve}
        else:
            scores = self._evaluate(instruct_dir, split, blind=True, out_dir=self.results / name)
        result = {
            "settings": self.settings,
            **scores,
            "align_s": align_s,
            "instruct_s": instruct_s,
            "align_trainable": align_trainable,
            "instruct_trainable": instruct_trainable,
        }
        path.write_text(json.dumps(result, indent=2))
        return result

    def _finished(self, path: Path) -> dict | None:
        """The JSON a finished run or stage left at `path`, if it was made with these settings."""
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved if saved.get("settings") == self.settings else None

    def remove_models(self) -> None:
        """The trained folders (every result is in `results/`); the sweep's are kept until the choice is made."""
        for folder in self.work.glob("*-seed*-*"):
            shutil.rmtree(folder)

    def _stage(
        self, arch: str, seed: int, stage: str, lr: float, *, init: str, curve: bool = False
    ) -> tuple[Path, float, int, list[dict] | None]:
        """Train one stage (reused when its folder is complete); returns its folder, seconds, trainable count and,
        with `curve`, its validation accuracy at evenly spaced steps."""
        from saisa.processing import SaisaProcessor
        from saisa.training import load_recipe, run_training

        out = self.work / f"{arch}-seed{seed}-{stage}" / (f"lr{lr:g}" if stage == "instruct" else "")
        report = out / "training_report.json"
        saved = self._finished(report)
        if saved is not None and (not curve or "validation_curve" in saved):
            return out, saved["wall_time_s"], saved["trainable_parameters"], saved.get("validation_curve")
        overrides = [
            f"architecture={arch}",
            f"model.init={init}",
            f"model.feature_cache={self.features}",
            f"data.train={self.data[stage]}",
            f"data.image_folder={self.work / 'data'}",
            f"output_dir={out}",
            f"training.seed={seed}",
            f"training.learning_rate={lr}",
            f"training.per_device_train_batch_size={self.args.batch_size}",
            "training.save_strategy='no'",  # a full-LLM checkpoint is 2 GB with its optimizer; the runs are minutes
            *paper_policy(arch, stage),
        ]
        if stage == "align":
            overrides.append(f"model.image_size={self.args.image_size}")
        callbacks = []
        if curve:
            processor = SaisaProcessor.from_pretrained(init)  # the one the stage trains with, saved by align
            callbacks.append(ValidationCurve(partial(self._accuracy, processor=processor), self.args.curve_points))
        started = time.perf_counter()
        run_training(load_recipe(f"embedded-{stage}", overrides), callbacks=callbacks)
        saved = json.loads(report.read_text())
        saved.update(settings=self.settings, wall_time_s=time.perf_counter() - started)
        if curve:
            saved["validation_curve"] = callbacks[0].curve
        report.write_text(json.dumps(saved, indent=2))
        return out, saved["wall_time_s"], saved["trainable_parameters"], saved.get("validation_curve")

    def _accuracy(self, model, *, processor) -> float:
        """Validation accuracy of a model being trained (its feature cache attached by the training run)."""
        from saisa.evaluation import evaluate

        return evaluate(model, processor, self.data["val"], self.work / "data", batch_size=32, max_new_tokens=8)[
            "accuracy"
        ]

    def _evaluate(self, model_dir: Path, split: str, *, blind: bool, out_dir: Path) -> dict:
        """Accuracy (and blind accuracy) on a split, and which questions were answered right (for the paired test)."""
        from saisa.checkpoints.loading import load_pretrained
        from saisa.evaluation import evaluate
        from saisa.model.feature_cache import VisionFeatureCache

        model, processor = load_pretrained(model_dir, device=self.args.device, dtype=self.args.dtype)
        model.vision_feature_cache = VisionFeatureCache(self.features)
        kwargs = dict(out_dir=out_dir, batch_size=32, max_new_tokens=8)
        scores = {
            "visual_tokens": model.tokens_per_image,
            "accuracy": evaluate(model, processor, self.data[split], self.work / "data", **kwargs)["accuracy"],
        }
        predictions = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
        scores["correct"] = {r["question_id"]: r["correct"] == 1.0 for r in predictions if "error" not in r}
        if blind:
            scores["blind_accuracy"] = evaluate(
                model, processor, self.data[split], self.work / "data", blind=True, **kwargs
            )["accuracy"]
        return scores


class ValidationCurve(TrainerCallback):
    """Validation accuracy before training and at `points` evenly spaced steps (the last included), measured in the
    training process: no checkpoint is written. The RNG state is put back after each measurement, so a run with a
    curve trains as one without."""

    def __init__(self, measure: Callable[[torch.nn.Module], float], points: int):
        self.measure, self.points = measure, points
        self.curve: list[dict] = []
        self.every = 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.every = max(1, math.ceil(state.max_steps / self.points))
        self._point(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._point(model, state.global_step)

    def _point(self, model, step: int) -> None:
        rng = torch.get_rng_state()
        model.eval()
        self.curve.append({"step": step, "accuracy": self.measure(model)})
        model.train()
        torch.set_rng_state(rng)
        logger.info("reproduce: validation accuracy %.3f at step %d", self.curve[-1]["accuracy"], step)


def paper_policy(arch: str, stage: str) -> list[str]:
    """Recipe overrides for the paper's training policy, the same kind for every architecture: `align` trains the
    projector(s) only (SAISA: one projector shared by all layers, copied into the per-layer ones for `instruct`, as
    LLaVA's one projector); `instruct` trains the projector(s) and the whole LLM, no LoRA."""
    if stage == "align":
        return [f"model.shared_projector={arch == 'saisa'}", "freeze_llm=false"]
    return ["lora.r=0", "freeze_llm=false"]


def _settings_argv(args: ReproduceSettings) -> list[str]:
    """The options that change what the comparison computes (not where it writes or what it keeps), as command-line
    text: with them, the command reruns it exactly."""
    sizes = [key for name in args.tasks for key in TASKS[name].size_keys]
    return [
        "--tasks " + " ".join(args.tasks),
        *_options(args, sizes),
        "--instruct-lrs " + " ".join(f"{lr:g}" for lr in args.instruct_lrs),
        "--seeds " + " ".join(map(str, args.seeds)),
    ]


def _run_key(args: ReproduceSettings, task: Task) -> list[str]:
    """What one task's run (a stage, an evaluation) depends on: not the learning-rate grid, the seed list nor the other
    tasks' sizes; a finished run is reused while this is unchanged."""
    return [f"--task {task.name}", *_options(args, task.size_keys)]


def _options(args: ReproduceSettings, sizes: list[str] | tuple[str, ...]) -> list[str]:
    """The data sizes given, between the settings every task's runs share."""
    keys = ("image_size", *sizes, "batch_size", "curve_points")
    return [f"--{key.replace('_', '-')} {getattr(args, key)}" for key in keys] + [f"--align-lr {args.align_lr:g}"]


# -- efficiency curve -----------------------------------------------------------------------------------------------
def efficiency_curve(image_sizes: list[int], test_questions: Path, repeats: int, *, device=None) -> list[dict]:
    """Per image size: SAISA / LLaVA prefill FLOPs (analytic and counted), TTFT and training-step time (the instruct
    policy: projectors + whole LLM, AdamW), on the real embedded models (untrained projectors: cost does not depend on
    their values). Medians of interleaved repeats, so drift on the machine hits both alike."""
    from torch.utils.flop_counter import FlopCounterMode

    from saisa.bench.flops import dims_from_config, prefill_flops
    from saisa.embedded import build_embedded_default
    from saisa.evaluation.runner import load_questions
    from saisa.inference.generation import user_prompt
    from saisa.processing import open_image
    from saisa.processing.templates import IGNORE_INDEX
    from saisa.training.stages import configure_stage

    rows = load_questions(test_questions)[:TIMING_SAMPLES]
    images = [open_image(test_questions.parent / row["image"]) for row in rows]
    curve = []
    for size in image_sizes:
        point, jobs = {"image_size": size}, {}
        for arch in ("saisa", "llava"):
            torch.manual_seed(0)
            model, processor = build_embedded_default(arch, image_size=size)
            model.to(device or "cpu")
            prompt = processor(text=user_prompt(processor, rows[0]["text"], 1), images=images[:1], return_tensors="pt")
            batch = processor(
                text=[user_prompt(processor, row["text"], 1) + " " + row["answer"] for row in rows],
                images=images,
                return_tensors="pt",
            )
            prompt, batch = prompt.to(model.device), batch.to(model.device)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            text_tokens = int(prompt["input_ids"].shape[1])
            model.eval()
            with FlopCounterMode(display=False) as total, torch.no_grad():
                model(**prompt, use_cache=False)
            with FlopCounterMode(display=False) as vision, torch.no_grad():
                model.encode_images(prompt["pixel_values"])
            analytic = prefill_flops(dims_from_config(model.config), arch, text_tokens, lm_head=True)
            point[arch] = {
                "visual_tokens": model.tokens_per_image,
                "prompt_text_tokens": text_tokens,
                "analytic_prefill_flops": analytic["total"],
                # sdpa is not counted by FlopCounterMode: its analytic share is added
                "counted_prefill_flops": total.get_total_flops() - vision.get_total_flops() + analytic["attention"],
            }
            trainable = configure_stage(model, "instruct")
            optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=0.0)
            jobs[arch] = {
                "ttft_s": partial(_ttft, model, prompt),
                "train_step_s": partial(_train_step, model, batch, optimizer),
            }
            for job in jobs[arch].values():  # warm-up: allocations, optimizer state
                job()()
        measured = interleaved(jobs, repeats, device=device, description=f"timing at {size} px")
        for arch in jobs:
            point[arch].update(medians(measured[arch]))
        saisa, llava = point["saisa"], point["llava"]
        curve.append(
            {
                "visual_tokens": saisa["visual_tokens"],
                "prefill_flops_ratio": saisa["counted_prefill_flops"] / llava["counted_prefill_flops"],
                "analytic_prefill_flops_ratio": saisa["analytic_prefill_flops"] / llava["analytic_prefill_flops"],
                "ttft_ratio": saisa["ttft_s"] / llava["ttft_s"],
                "train_step_ratio": saisa["train_step_s"] / llava["train_step_s"],
                **point,
            }
        )
        logger.info("reproduce: efficiency at v = %d: %s", saisa["visual_tokens"], json.dumps(curve[-1])[:300])
    return curve


def _ttft(model, prompt):
    """Set-up of a timed time to first token: eval mode, then one prefill of the prompt."""
    model.eval()
    return partial(first_token, model, prompt)


def first_token(model, prompt) -> None:
    """One prefill of `prompt` and its first token: what a time to first token times."""
    with torch.no_grad():
        model(**prompt, logits_to_keep=1).logits.argmax(-1)


def _train_step(model, batch, optimizer):
    """Set-up of a timed training step: train mode, then forward + backward + the optimizer's step."""
    model.train()
    return partial(_step, model, batch, optimizer)


def _step(model, batch, optimizer) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
