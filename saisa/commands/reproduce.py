"""`saisa reproduce`: a small-scale replication of the paper's comparisons on real models (SmolLM2-135M-Instruct +
EfficientNet-Lite0, Fashion-MNIST), fair by construction:

- the paper's training policy for all three architectures: `align` trains the projector(s) only, `instruct` the
  projector(s) and the whole LLM (no LoRA); the same data, steps and schedule for all;
- the instruct learning rate chosen per architecture on a validation split (questions on training-split images no
  training record uses), from the same grid for all three; the test split is read once per final model;
- several seeds (projector initialisation and data order) per architecture, each seed's figure kept;
- an efficiency curve at several numbers of visual tokens on the same real models, measured side by side.

The frozen encoder's features are computed once per image and reused by every stage, architecture and seed
(`saisa.vision.feature_cache`). Finished runs are reused when the command is run again with the same settings.
Writes `reproduction.json`, `reproduction.md` and `reproduction.png` under `--docs`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from saisa.loading import add_device_arguments

ARCHS = ("saisa", "llava", "naavit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/reproduce")
    parser.add_argument("--docs", default="docs", help="where reproduction.md/.json/.png go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=224, help="224 px: 7x7 = 49 visual tokens")
    parser.add_argument("--align-per-class", type=int, default=30, help="align captions per class")
    parser.add_argument("--instruct-per-class", type=int, default=30, help="instruct questions per class")
    parser.add_argument("--val-per-class", type=int, default=10, help="validation questions per class (LR choice)")
    parser.add_argument("--test-per-class", type=int, default=20, help="held-out test questions per class")
    parser.add_argument("--batch-size", type=int, default=4, help="small: more steps for the same compute")
    parser.add_argument("--align-lr", type=float, default=1e-3, help="LLaVA-1.5's align learning rate")
    parser.add_argument(
        "--instruct-lrs", type=float, nargs="+", default=[2e-5, 1e-4], help="the grid searched for every architecture"
    )
    parser.add_argument("--curve-image-sizes", type=int, nargs="+", default=[112, 224, 448], help="9, 49, 196 tokens")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats per curve point")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite reproduction.md and .png from --docs/reproduction.json"
    )
    parser.add_argument(
        "--curve-only", action="store_true", help="only the efficiency curve (minutes): no training, no accuracy table"
    )
    parser.add_argument("--note", help="the operator's note, kept in the JSON and printed in the markdown")
    parser.add_argument("--keep-models", action="store_true", help="keep every trained model folder (~0.6 GB each)")
    add_device_arguments(parser)  # for evaluation and timing; training runs where the Trainer finds an accelerator


def run(args: argparse.Namespace) -> int:
    docs = Path(args.docs)
    if args.report_only:
        result = json.loads((docs / "reproduction.json").read_text())
        plot(result, docs / "reproduction.png")
        (docs / "reproduction.md").write_text(markdown(result))
        print((docs / "reproduction.md").read_text())
        return 0
    start = time.perf_counter()
    if args.curve_only:
        from saisa.data.fashion_mnist import prepare

        main, test = None, prepare(Path(args.workdir) / "data", train_per_class=1, test_per_class=1)["test"]
    else:
        main = train_and_evaluate(args)
        test = Path(main["data"]["test"])
    curve = efficiency_curve(args.curve_image_sizes, test, args.repeats, device=args.device)
    result = {
        "main": main,
        "efficiency_curve": curve,
        "command": "saisa reproduce " + ("--curve-only " if args.curve_only else "") + " ".join(_settings_argv(args)),
        "wall_time_s": time.perf_counter() - start,
        # other work on the machine slows every run alike but stretches the wall times: say how busy it was
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "note": args.note,
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "reproduction.json").write_text(json.dumps(result, indent=2))
    plot(result, docs / "reproduction.png")
    (docs / "reproduction.md").write_text(markdown(result))
    print((docs / "reproduction.md").read_text())
    return 0


# -- training and evaluation ----------------------------------------------------------------------------------------
def train_and_evaluate(args: argparse.Namespace) -> dict:
    from saisa.data.fashion_mnist import keep_first_records, prepare

    work = Path(args.workdir)
    data = prepare(
        work / "data",
        train_per_class=max(args.align_per_class, args.instruct_per_class),
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        seed=0,  # one data set for every seed: seeds vary initialisation and order, not the questions
    )
    keep_first_records(data["align"], args.align_per_class * 10)
    keep_first_records(data["instruct"], args.instruct_per_class * 10)
    runner = Runs(work, data, args)
    per_arch = {}
    for arch in ARCHS:  # seed 0 of every architecture first: a partial run already compares all three
        per_arch[arch] = {"learning_rate_sweep": runner.sweep(arch, args.seeds[0])}
    for arch in ARCHS:
        sweep = per_arch[arch]["learning_rate_sweep"]
        lr = max(sweep, key=lambda row: row["val_accuracy"])["learning_rate"]  # the first of equals: grid order
        runs = [runner.final(arch, seed, lr) for seed in args.seeds]
        accuracies = [r["accuracy"] for r in runs]
        mean, std = _mean_std(accuracies)
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
    return {
        "visual_tokens": runs[0]["visual_tokens"],
        "seeds": list(args.seeds),
        "architectures": per_arch,
        "policy": {"align": "projector(s) only", "instruct": "projector(s) + the whole LLM"},
        "data": {
            "align_samples": args.align_per_class * 10,
            "instruct_samples": args.instruct_per_class * 10,
            "val_questions": args.val_per_class * 10,
            "test_questions": args.test_per_class * 10,
            "batch_size": args.batch_size,
            "align_learning_rate": args.align_lr,
            "instruct_learning_rate_grid": list(args.instruct_lrs),
            **{split: str(path) for split, path in data.items()},
        },
    }


class Runs:
    """Every training stage and evaluation of the reproduction, each written to `workdir/results/` when it finishes and
    reused from there when the same run (same settings) is asked for again."""

    def __init__(self, work: Path, data: dict[str, Path], args: argparse.Namespace):
        self.work, self.data, self.args = work, data, args
        self.features = work / "features"
        self.results = work / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.settings = _settings_argv(args)[:-2]  # a run's result does not depend on the grid or the seed list

    def sweep(self, arch: str, seed: int) -> list[dict]:
        """Instruct at every grid learning rate from this seed's align stage; accuracy on the validation split."""
        rows = []
        for lr in self.args.instruct_lrs:
            run = self._run(arch, seed, lr, split="val")
            rows.append({"learning_rate": lr, "val_accuracy": run["accuracy"]})
        return rows

    def final(self, arch: str, seed: int, lr: float) -> dict:
        return self._run(arch, seed, lr, split="test")

    def _run(self, arch: str, seed: int, lr: float, *, split: str) -> dict:
        name = f"{arch}-seed{seed}-lr{lr:g}-{split}"
        path = self.results / f"{name}.json"
        if (finished := self._finished(path)) is not None:
            print(f"reproduce: reusing {path}")
            return finished
        align_dir, align_s, align_trainable = self._stage(arch, seed, "align", self.args.align_lr, init="embedded")
        instruct_dir, instruct_s, instruct_trainable = self._stage(arch, seed, "instruct", lr, init=str(align_dir))
        scores = self._evaluate(instruct_dir, split, blind=split == "test", out_dir=self.results / name)
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

    def _stage(self, arch: str, seed: int, stage: str, lr: float, *, init: str) -> tuple[Path, float, int]:
        """Train one stage (reused when its folder is complete); returns its folder, seconds and trainable count."""
        from saisa.training import load_recipe, run_training

        out = self.work / f"{arch}-seed{seed}-{stage}" / (f"lr{lr:g}" if stage == "instruct" else "")
        report = out / "training_report.json"
        if (saved := self._finished(report)) is not None:
            return out, saved["wall_time_s"], saved["trainable_parameters"]
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
        started = time.perf_counter()
        run_training(load_recipe(f"embedded-{stage}", overrides))
        saved = json.loads(report.read_text())
        saved.update(settings=self.settings, wall_time_s=time.perf_counter() - started)
        report.write_text(json.dumps(saved, indent=2))
        return out, saved["wall_time_s"], saved["trainable_parameters"]

    def _evaluate(self, model_dir: Path, split: str, *, blind: bool, out_dir: Path) -> dict:
        from saisa.evaluation import evaluate
        from saisa.loading import load_pretrained
        from saisa.vision.feature_cache import VisionFeatureCache

        model, processor = load_pretrained(model_dir, device=self.args.device, dtype=self.args.dtype)
        model.vision_feature_cache = VisionFeatureCache(self.features)
        kwargs = dict(out_dir=out_dir, batch_size=32, max_new_tokens=8)
        scores = {
            "visual_tokens": model.tokens_per_image,
            "accuracy": evaluate(model, processor, self.data[split], self.work / "data", **kwargs)["accuracy"],
        }
        if blind:
            scores["blind_accuracy"] = evaluate(
                model, processor, self.data[split], self.work / "data", blind=True, **kwargs
            )["accuracy"]
        return scores


def paper_policy(arch: str, stage: str) -> list[str]:
    """Recipe overrides for the paper's training policy, the same kind for every architecture: `align` trains the
    projector(s) only (SAISA: one projector shared by all layers, copied into the per-layer ones for `instruct`, as
    LLaVA's one projector); `instruct` trains the projector(s) and the whole LLM, no LoRA."""
    if stage == "align":
        return [f"model.shared_projector={arch == 'saisa'}", "freeze_llm=false"]
    return ["lora.r=0", "freeze_llm=false"]


def _settings_argv(args: argparse.Namespace) -> list[str]:
    """The options that change what a run computes (not where it writes or what it keeps), as command-line text."""
    keys = ("image_size", "align_per_class", "instruct_per_class", "val_per_class", "test_per_class", "batch_size")
    argv = [f"--{key.replace('_', '-')} {getattr(args, key)}" for key in keys]
    argv.append(f"--align-lr {args.align_lr:g}")
    # the last two: what the whole comparison searches and repeats (kept last: `Runs` leaves them out of a run's key)
    argv.append("--instruct-lrs " + " ".join(f"{lr:g}" for lr in args.instruct_lrs))
    argv.append("--seeds " + " ".join(map(str, args.seeds)))
    return argv


# -- efficiency curve -----------------------------------------------------------------------------------------------
def efficiency_curve(image_sizes: list[int], test_questions: Path, repeats: int, *, device=None) -> list[dict]:
    """Per image size: SAISA / LLaVA prefill FLOPs (analytic and counted), TTFT and training-step time (the instruct
    policy: projectors + whole LLM, AdamW), on the real embedded models (untrained projectors: cost does not depend on
    their values). Medians of interleaved repeats, so drift on the machine hits both alike."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from saisa.embedded import build_embedded_default
    from saisa.evaluation.runner import load_questions
    from saisa.flops import dims_from_config, prefill_flops
    from saisa.generation import user_prompt
    from saisa.processing import load_image
    from saisa.training.stages import configure_stage

    rows = load_questions(test_questions)[:4]
    images = [load_image(test_questions.parent / row["image"]) for row in rows]
    curve = []
    for size in image_sizes:
        point, timings = {"image_size": size}, {}
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
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
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
            timings[arch] = {"ttft": _ttft(model, prompt), "train_step": _train_step(model, batch, optimizer)}
            for warm_up in timings[arch].values():  # allocations, optimizer state
                warm_up()
        measured = {arch: {"ttft_s": [], "train_step_s": []} for arch in timings}
        for _ in range(repeats):
            for arch, fns in timings.items():
                measured[arch]["ttft_s"].append(fns["ttft"]())
                measured[arch]["train_step_s"].append(fns["train_step"]())
        for arch in timings:
            point[arch].update({key: statistics.median(values) for key, values in measured[arch].items()})
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
        print(f"reproduce: efficiency at v = {saisa['visual_tokens']}: {json.dumps(curve[-1], default=str)[:300]}")
    return curve


def _ttft(model, prompt):
    import torch

    def once() -> float:
        model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            model(**prompt, logits_to_keep=1).logits.argmax(-1)
            return time.perf_counter() - start

    return once


def _train_step(model, batch, optimizer):
    def once() -> float:
        model.train()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return once


# -- report ---------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(result: dict) -> str:
    main, curve = result["main"], result["efficiency_curve"]
    lines = ["# Small-scale reproduction: SAISA vs LLaVA-1.5 vs NAAViT", ""]
    lines += _main_section(result) if main else _main_not_run(result)
    lines += [
        "",
        "## Efficiency on the same real models (SAISA / LLaVA, measured side by side in one run)",
        "",
        "| visual tokens | text tokens | prefill FLOPs (counted) | (analytic) | TTFT | training step |",
        "|---|---|---|---|---|---|",
    ]
    for point in curve:
        lines.append(
            f"| {point['visual_tokens']} | {point['saisa']['prompt_text_tokens']} "
            f"| {point['prefill_flops_ratio']:.2f} | {point['analytic_prefill_flops_ratio']:.2f} "
            f"| {point['ttft_ratio']:.2f} | {point['train_step_ratio']:.2f} |"
        )
    last, first = curve[-1], curve[0]
    lines += [
        "",
        "SmolLM2-135M-Instruct + EfficientNet-Lite0 at 112, 224 and 448 px (untrained projectors: cost does not depend "
        "on their values), fp32. FLOPs exclude the vision encoder (the same for both) and include the LM head; TTFT is "
        "one prefill of a real test prompt (batch 1); the training step is forward + backward + AdamW under the "
        "instruct policy on 4 real samples. Medians of interleaved repeats.",
        "",
        "![the efficiency curve](reproduction.png)",
        "",
        "## Reading it against the paper",
        "",
        f"- **Efficiency.** At v = {last['visual_tokens']} SAISA's prefill FLOPs are "
        f"{last['prefill_flops_ratio']:.2f}x LLaVA's and its TTFT {last['ttft_ratio']:.2f}x; "
        f"at v = {first['visual_tokens']} "
        f"{first['prefill_flops_ratio']:.2f}x and {first['ttft_ratio']:.2f}x. The saving grows with the share of "
        "visual tokens in the prompt, as the paper's analysis says (its 0.34x is at v = 576, t = 64). A training step "
        f"costs {first['train_step_ratio']:.2f}x / {last['train_step_ratio']:.2f}x LLaVA's at v = "
        f"{first['visual_tokens']} / {last['visual_tokens']}: SAISA's per-layer projectors add parameters to the "
        "optimizer step (the paper's "
        "0.74x training time is at v = 576).",
    ]
    if main:
        lines += _main_reading(main)
    return "\n".join(lines) + "\n"


def _main_not_run(result: dict) -> list[str]:
    lines = [
        f"Written by `{result['command']}` from `reproduction.json` (wall time {result['wall_time_s'] / 60:.0f} min, "
        f"{_machine(result)[:-1]}).",
        "",
        "**The accuracy comparison (`saisa reproduce` without `--curve-only`) has not been run at this commit.**",
    ]
    return lines + _note(result)


def _note(result: dict) -> list[str]:
    """The operator's note (`--note`) as its own paragraph, if there is one."""
    return ["", result["note"]] if result.get("note") else []


def _main_section(result: dict) -> list[str]:
    main = result["main"]
    archs, data = main["architectures"], main["data"]
    seeds = main["seeds"]
    lines = [
        f"Written by `{result['command']}` from `reproduction.json` (wall time {result['wall_time_s'] / 60:.0f} min). "
        f"Real SmolLM2-135M-Instruct + EfficientNet-Lite0 at {main['visual_tokens']} visual tokens per image; "
        f"Fashion-MNIST images with text made from their labels: {data['align_samples']} align captions, "
        f"{data['instruct_samples']} instruct questions, {data['val_questions']} validation and "
        f"{data['test_questions']} test questions (disjoint images). fp32 on CPU; {_machine(result)}",
        *_note(result),
        "",
        "**Training policy, the same for all three (the paper's):** align trains the projector(s) only "
        f"(lr {data['align_learning_rate']:g}); instruct trains the projector(s) and the whole LLM. Same data, batch "
        f"({data['batch_size']}), steps, schedule (cosine, 3% warm-up) for every architecture. The instruct learning "
        "rate is chosen per architecture on the validation split from the same grid "
        f"({', '.join(f'{lr:g}' for lr in data['instruct_learning_rate_grid'])}), at seed {seeds[0]}; the test split "
        f"is read once per final model. Seeds {', '.join(map(str, seeds))} change the projectors' initialisation and "
        "the data order, not the data.",
        "",
        "| architecture | test accuracy, mean ± std | per seed | blind, per seed | chosen lr (val acc. per lr) "
        "| trainable params align / instruct | training wall time per seed (both stages, load and save included) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        r = archs[arch]
        mean, std = _mean_std(r["accuracy_per_seed"])
        sweep = ", ".join(
            f"{row['learning_rate']:g}: {100 * row['val_accuracy']:.1f}%" for row in r["learning_rate_sweep"]
        )
        lines.append(
            f"| {arch} | {100 * mean:.1f} ± {100 * std:.1f}% "
            f"| {' / '.join(f'{100 * a:.1f}' for a in r['accuracy_per_seed'])} "
            f"| {' / '.join(f'{100 * a:.1f}' for a in r['blind_accuracy_per_seed'])} "
            f"| {r['instruct_learning_rate']:g} ({sweep}) "
            f"| {r['trainable_parameters']['align'] / 1e6:.2f} M / {r['trainable_parameters']['instruct'] / 1e6:.1f} M "
            f"| {' / '.join(f'{t:.0f}' for t in r['train_time_s_per_seed'])} s |"
        )
    return lines


def _main_reading(main: dict) -> list[str]:
    archs, seeds = main["architectures"], main["seeds"]
    saisa, llava, naavit = (archs[a] for a in ARCHS)
    param_ratio = saisa["trainable_parameters"]["instruct"] / llava["trainable_parameters"]["instruct"]
    time_ratio = statistics.mean(saisa["train_time_s_per_seed"]) / statistics.mean(llava["train_time_s_per_seed"])
    grid = main["data"]["instruct_learning_rate_grid"]
    at_edge = [arch for arch in ARCHS if archs[arch]["instruct_learning_rate"] in (min(grid), max(grid))]
    best = max(archs[arch]["accuracy_mean"] for arch in ARCHS)
    return [
        f"- **Accuracy.** SAISA {_diff(saisa, llava)} and NAAViT {_diff(naavit, llava)} against LLaVA-1.5, means over "
        f"{len(seeds)} seeds. {_verdict(saisa, llava)} The paper reports SAISA above LLaVA-1.5 on most benchmarks at "
        "7B scale with 558K + 665K samples; this run has a 135M LLM and a few hundred samples, so it tests whether the "
        "architecture learns the task as well under the same budget, not the paper's numbers.",
        f"- **Trainable parameters.** SAISA's instruct stage trains {param_ratio:.2f}x LLaVA's (its per-layer "
        "projectors); the paper's ratio at Vicuna-7B is about 1.09x. Align trains one shared projector for SAISA, as "
        "LLaVA's one projector.",
        f"- **Training time** over both stages: SAISA / LLaVA {time_ratio:.2f} (paper: 0.74 in GPU hours at v = 576).",
        f"- **Limits of this run.** The best mean is {100 * best:.1f}%: every model is still learning the task (the "
        "embedded demo, with LoRA and 9 visual tokens, reaches about 72% with 4,000 + 2,000 samples), so the table "
        "compares how fast each architecture learns from the same few hundred samples, not where it would end. Three "
        "seeds leave a standard deviation of several points per architecture."
        + (
            f" The chosen learning rate is at the edge of the grid for {', '.join(at_edge)}: a wider grid could choose "
            "another."
            if at_edge
            else ""
        ),
    ]


def _machine(result: dict) -> str:
    machine = result.get("machine", {})
    text = f"{machine.get('cpus', '?')} cores"
    if "load_average_at_end" in machine:
        text += f", load average {machine['load_average_at_end'][2]:.1f} over the last 15 min of the run"
    if "note" in machine:
        text += f" ({machine['note']})"
    return text + "."


def _diff(report: dict, reference: dict) -> str:
    return f"{100 * (report['accuracy_mean'] - reference['accuracy_mean']):+.1f} points"


def _verdict(report: dict, reference: dict) -> str:
    gap = report["accuracy_mean"] - reference["accuracy_mean"]
    spread = max(report["accuracy_std"], reference["accuracy_std"])
    if abs(gap) <= 2 * spread:
        return f"The gap is within two standard deviations across seeds ({100 * spread:.1f} points): not significant."
    return f"The gap is larger than two standard deviations across seeds ({100 * spread:.1f} points)."


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main, curve = result["main"], result["efficiency_curve"]
    fig, axes = plt.subplots(1, 2 if main else 1, figsize=(11 if main else 5.5, 3.8), squeeze=False)
    axes = axes[0]
    if main:
        _plot_accuracy(axes[0], main)
    curve_axis = axes[-1]
    tokens = [p["visual_tokens"] for p in curve]
    for key, label in (
        ("prefill_flops_ratio", "prefill FLOPs"),
        ("ttft_ratio", "TTFT"),
        ("train_step_ratio", "training step"),
    ):
        curve_axis.plot(tokens, [p[key] for p in curve], marker="o", label=label)
    curve_axis.axhline(1.0, color="gray", lw=0.8)
    curve_axis.set_xscale("log")
    curve_axis.set_xticks(tokens, [str(t) for t in tokens])
    curve_axis.set_xlabel("visual tokens per image")
    curve_axis.set_title("SAISA / LLaVA (lower is cheaper)")
    curve_axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(axis, main: dict) -> None:
    archs = main["architectures"]
    colours = {"saisa": "tab:green", "llava": "tab:blue", "naavit": "tab:orange"}
    for x, arch in enumerate(ARCHS):
        per_seed = [100 * a for a in archs[arch]["accuracy_per_seed"]]
        mean, std = _mean_std(per_seed)
        axis.bar(x, mean, yerr=std, color=colours[arch], capsize=6, alpha=0.8)
        axis.scatter([x] * len(per_seed), per_seed, color="black", zorder=3, s=12)
        axis.bar(x, statistics.mean(100 * a for a in archs[arch]["blind_accuracy_per_seed"]), color="lightgray")
    axis.set_xticks(range(len(ARCHS)), ARCHS)
    axis.set_title(f"test accuracy (%), mean ± std of {len(main['seeds'])} seeds; grey: blind")
