"""The report of `saisa reproduce`: reproduction.md, reproduction.png (accuracy per task, efficiency curve) and
reproduction_curves.png (validation accuracy vs step per task) rendered from reproduction.json alone (every figure in
the prose is read from the JSON: the run's results, its setup, and the paper's figures it recorded)."""

from __future__ import annotations

import statistics
from pathlib import Path

ARCHS = ("saisa", "llava", "naavit")
SIGNIFICANCE_LEVEL = 0.05


def write_report(result: dict, docs: Path) -> str:
    """Write reproduction.md and the plots under `docs` from `result` (reproduction.json's content); returns the
    markdown."""
    if "tasks" not in result:  # the first comparison's JSON (one task under "main"), before easy-VQA joined
        raise ValueError(
            "this reproduction.json was written by an older `saisa reproduce` (Fashion-MNIST alone, under 'main'), "
            "which this report cannot render: run `saisa reproduce` (or `saisa reproduce --quick`) to write it anew"
        )
    plot(result, docs / "reproduction.png")
    if result["tasks"]:
        plot_curves(result["tasks"], docs / "reproduction_curves.png")
    text = markdown(result)
    (docs / "reproduction.md").write_text(text)
    return text


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(result: dict) -> str:
    tasks, curve = result["tasks"], result["efficiency_curve"]
    lines = ["# Small-scale reproduction: SAISA vs LLaVA-1.5 vs NAAViT", ""]
    if tasks:
        lines += _run_section(result)
        for name, task in tasks.items():
            lines += _task_section(name, task, result["paper"])
    else:
        lines += _main_not_run(result)
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
    setup, paper = result["setup"], result["paper"]
    sizes = [str(point["image_size"]) for point in curve]
    sizes = ", ".join(sizes[:-1]) + " and " + sizes[-1] if len(sizes) > 1 else sizes[0]
    lines += [
        "",
        f"{_models(setup)} at {sizes} px (untrained projectors: cost does not depend on their values), "
        f"{setup['dtype']} on {setup['device']}. FLOPs exclude the vision encoder (the same for both) and include the "
        "LM head; TTFT is one prefill of a real test prompt (batch 1); the training step is forward + backward + AdamW "
        f"under the instruct policy on {setup['timing_samples']} real samples. Medians of {setup['timing_repeats']} "
        "interleaved repeats.",
        "",
        "![the efficiency curve](reproduction.png)",
        "",
        "## Reading it against the paper",
        "",
        f"- **Efficiency.** At v = {last['visual_tokens']} SAISA's prefill FLOPs are "
        f"{last['prefill_flops_ratio']:.2f}x LLaVA's and its TTFT {last['ttft_ratio']:.2f}x; "
        f"at v = {first['visual_tokens']} "
        f"{first['prefill_flops_ratio']:.2f}x and {first['ttft_ratio']:.2f}x. The saving grows with the share of "
        f"visual tokens in the prompt, as the paper's analysis says (its {paper['prefill_flops_ratio']:.2f}x is at "
        f"v = {paper['visual_tokens']}, t = {paper['text_tokens']}). A training step "
        f"costs {first['train_step_ratio']:.2f}x / {last['train_step_ratio']:.2f}x LLaVA's at v = "
        f"{first['visual_tokens']} / {last['visual_tokens']}: SAISA's per-layer projectors add parameters to the "
        f"optimizer step (the paper's {paper['training_time_ratio']:.2f}x training time is at "
        f"v = {paper['visual_tokens']}).",
    ]
    if tasks:
        lines.append(
            f"- **Accuracy.** The paper reports SAISA above LLaVA-1.5 on most benchmarks at {paper['llm']} with "
            f"{paper['align_samples']:,} + {paper['instruct_samples']:,} samples; this run has a far smaller LLM and "
            "the samples given per task above, so it tests whether the architecture learns each task as well under "
            "the same budget, not the paper's numbers."
        )
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


def _run_section(result: dict) -> list[str]:
    """What ran (command, models, machine) and the training policy every task shares."""
    first = next(iter(result["tasks"].values()))
    data, seeds = first["data"], first["seeds"]
    return [
        f"Written by `{result['command']}` from `reproduction.json` (wall time {result['wall_time_s'] / 60:.0f} min). "
        f"Real {_models(result['setup'])} at {first['visual_tokens']} visual tokens per image, "
        f"{result['setup']['dtype']} on {result['setup']['device']}; {_machine(result)}",
        *_note(result),
        "",
        "**Training policy, the same for all three (the paper's):** align trains the projector(s) only "
        f"(lr {data['align_learning_rate']:g}); instruct trains the projector(s) and the whole LLM. Same data, batch "
        f"({data['batch_size']}), steps, schedule ({data['lr_scheduler']}, {100 * data['warmup_ratio']:g}% warm-up) "
        "for every architecture. The instruct learning "
        "rate is chosen per architecture and task on the validation split from the same grid "
        f"({', '.join(f'{lr:g}' for lr in data['instruct_learning_rate_grid'])}), at seed {seeds[0]}; the test split "
        f"is read once per final model. Seeds {', '.join(map(str, seeds))} change the projectors' initialisation and "
        "the data order, not the data.",
    ]


def _task_section(name: str, task: dict, paper: dict) -> list[str]:
    archs, data = task["architectures"], task["data"]
    lines = [
        "",
        f"## Task: {name}",
        "",
        f"{task['description']}: {data['align_samples']} align captions ({data['align_steps']} steps), "
        f"{data['instruct_samples']} instruct questions ({data['instruct_steps']} steps), {data['val_questions']} "
        f"validation and {data['test_questions']} test questions (disjoint images).",
        "",
        "| architecture | test accuracy, mean ± std | per seed | blind, per seed | chosen lr (val acc. per lr) "
        "| trainable params align / instruct | training wall time per seed (both stages, load and save included) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        r = archs[arch]
        mean, std = mean_std(r["accuracy_per_seed"])
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
    return lines + _curve_table(task) + _significance_table(task) + _task_reading(task, paper)


def chosen_curve(arch_result: dict) -> list[dict]:
    """The validation curve of the learning rate an architecture chose."""
    lr = arch_result["instruct_learning_rate"]
    return next(row for row in arch_result["learning_rate_sweep"] if row["learning_rate"] == lr)["validation_curve"]


def _curve_table(task: dict) -> list[str]:
    archs = task["architectures"]
    curves = {arch: chosen_curve(archs[arch]) for arch in ARCHS}
    lines = [
        "",
        f"Validation accuracy during the instruct stage (seed {task['seeds'][0]}, each architecture at its chosen "
        "learning rate; step 0 is the aligned model before it):",
        "",
        "| step | " + " | ".join(ARCHS) + " |",
        "|---|" + "---|" * len(ARCHS),
    ]
    for points in zip(*(curves[arch] for arch in ARCHS), strict=True):
        lines.append(f"| {points[0]['step']} | " + " | ".join(f"{100 * p['accuracy']:.1f}%" for p in points) + " |")
    return lines + ["", "![validation accuracy vs step](reproduction_curves.png)"]


def _significance_table(task: dict) -> list[str]:
    seeds = task["seeds"]
    lines = [
        "",
        f"Paired test on the same test questions (exact McNemar test, every seed's answers pooled: {len(seeds)} seeds "
        "x the test questions), and each seed's accuracy difference:",
        "",
        "| comparison | right only the first / only LLaVA | p (two-sided) | difference per seed (points) |",
        "|---|---|---|---|",
    ]
    for arch in ("saisa", "naavit"):
        test = task["significance"][f"{arch}_vs_llava"]
        per_seed = " / ".join(f"{100 * s['accuracy_difference']:+.1f}" for s in test["per_seed"])
        lines.append(
            f"| {arch} vs llava | {test['first_only']} / {test['second_only']} of {test['pairs']} pairs "
            f"| {test['p_value']:.3g} | {per_seed} |"
        )
    return lines


def _task_reading(task: dict, paper: dict) -> list[str]:
    archs, seeds = task["architectures"], task["seeds"]
    saisa, llava, naavit = (archs[a] for a in ARCHS)
    param_ratio = saisa["trainable_parameters"]["instruct"] / llava["trainable_parameters"]["instruct"]
    time_ratio = statistics.mean(saisa["train_time_s_per_seed"]) / statistics.mean(llava["train_time_s_per_seed"])
    grid = task["data"]["instruct_learning_rate_grid"]
    at_edge = [arch for arch in ARCHS if archs[arch]["instruct_learning_rate"] in (min(grid), max(grid))]
    widest = max(archs[arch]["accuracy_std"] for arch in ARCHS)
    late = " / ".join(f"{100 * _second_half_change(chosen_curve(archs[arch])):+.1f}" for arch in ARCHS)
    return [
        "",
        f"- **Accuracy.** SAISA {_diff(saisa, llava)} and NAAViT {_diff(naavit, llava)} against LLaVA-1.5, means over "
        f"{len(seeds)} seeds. {_verdict(task['significance']['saisa_vs_llava'], 'SAISA')} "
        f"{_verdict(task['significance']['naavit_vs_llava'], 'NAAViT')} Seeds leave a standard deviation of up to "
        f"{100 * widest:.1f} points per architecture.",
        f"- **Plateau.** Over the second half of the instruct steps validation accuracy moved by {late} points "
        f"({' / '.join(ARCHS)}).",
        f"- **Trainable parameters.** SAISA's instruct stage trains {param_ratio:.2f}x LLaVA's (its per-layer "
        f"projectors); the paper's ratio at {paper['llm']} is about {paper['instruct_trainable_ratio']:.2f}x. Align "
        "trains one shared projector for SAISA, as LLaVA's one projector.",
        f"- **Training time** over both stages: SAISA / LLaVA {time_ratio:.2f} (paper: "
        f"{paper['training_time_ratio']:.2f} in GPU hours at v = {paper['visual_tokens']})."
        + (
            f" The chosen learning rate is at the edge of the grid for {', '.join(at_edge)}: a wider grid could "
            "choose another."
            if at_edge
            else ""
        ),
    ]


def _second_half_change(curve: list[dict]) -> float:
    """Accuracy at the last point minus at the first point at or past half the steps."""
    half = next(p for p in curve if p["step"] >= curve[-1]["step"] / 2)
    return curve[-1]["accuracy"] - half["accuracy"]


def _models(setup: dict) -> str:
    return f"{setup['llm']} + {setup['vision']}"


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


def _verdict(test: dict, name: str) -> str:
    significant = test["p_value"] < SIGNIFICANCE_LEVEL
    return (
        f"{name} vs LLaVA: p = {test['p_value']:.3g}, "
        + ("significant" if significant else "not significant")
        + f" at the {100 * SIGNIFICANCE_LEVEL:g}% level."
    )


COLOURS = {"saisa": "tab:green", "llava": "tab:blue", "naavit": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict, path: Path) -> None:
    """Test accuracy per task, then the efficiency curve."""
    plt = _pyplot()
    tasks, curve = result["tasks"], result["efficiency_curve"]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.5 * (len(tasks) + 1), 3.8), squeeze=False)
    axes = axes[0]
    for axis, (name, task) in zip(axes, tasks.items(), strict=False):
        _plot_accuracy(axis, name, task)
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


def _plot_accuracy(axis, name: str, task: dict) -> None:
    archs = task["architectures"]
    for x, arch in enumerate(ARCHS):
        per_seed = [100 * a for a in archs[arch]["accuracy_per_seed"]]
        mean, std = mean_std(per_seed)
        axis.bar(x, mean, yerr=std, color=COLOURS[arch], capsize=6, alpha=0.8)
        axis.scatter([x] * len(per_seed), per_seed, color="black", zorder=3, s=12)
        axis.bar(x, statistics.mean(100 * a for a in archs[arch]["blind_accuracy_per_seed"]), color="lightgray")
    axis.set_xticks(range(len(ARCHS)), ARCHS)
    axis.set_title(f"{name}: test accuracy (%), {len(task['seeds'])} seeds; grey: blind", fontsize=9)


def plot_curves(tasks: dict, path: Path) -> None:
    """Validation accuracy vs instruct step per task, each architecture at its chosen learning rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for axis, (name, task) in zip(axes[0], tasks.items(), strict=True):
        for arch in ARCHS:
            curve = chosen_curve(task["architectures"][arch])
            axis.plot([p["step"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", ms=3, label=arch)
        axis.set_xlabel("instruct step")
        axis.set_ylabel("validation accuracy (%)")
        axis.set_title(f"{name} (seed {task['seeds'][0]})")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
