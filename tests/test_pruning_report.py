"""The pruning and views reports render what their JSON says: the goal's verdict is computed from the points."""

from __future__ import annotations

from saisa.experiments import pruning_accuracy, views_efficiency

MACHINE = {"cpus": 2, "load_average_at_end": [2.0, 2.0, 2.0]}


def _point(arch: str, ratio: float, accuracy: float, resolution: str = "224 px (v=49)") -> dict:
    return {
        "architecture": arch,
        "resolution": resolution,
        "method": "none" if ratio == 1 else "fastv",
        "keep_ratio": ratio,
        "visual_positions": 49,
        "kept_visual_entries": max(1, round(49 * ratio)),
        "accuracy": accuracy,
        "prefill_tflops": 0.01 * ratio,
        "visual_kv_mb": ratio,
    }


def test_the_goal_verdict_reads_the_points(tmp_path):
    result = {
        "task": "easy-VQA",
        "seed": 0,
        "learning_rate": 1e-4,
        "command": "x",
        "wall_time_s": 60,
        "machine": MACHINE,
        "points": [_point("saisa", 1.0, 0.80), _point("saisa", 0.25, 0.795), _point("llava", 1.0, 0.7)]
        + [_point("saisa", 1.0, 0.80, "tiles"), _point("saisa", 0.25, 0.70, "tiles")]
        + [{**_point("saisa", 0.25, 0.80), "method": "per_layer"}],
    }
    text = pruning_accuracy.markdown(result)
    assert "(v=49), fastv: SAISA 79.5% at r=0.25 against 80.0% at r=1 (-0.5 points): within the 1-point goal" in text
    assert (
        "tiles, fastv: SAISA 70.0% at r=0.25 against 80.0% at r=1 (-10.0 points): not within the 1-point goal" in text
    )
    assert "(v=49), per_layer: SAISA 80.0% at r=0.25 against 80.0% at r=1 (+0.0 points): within the 1-point" in text
    pruning_accuracy.plot(result, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_views_table_gives_each_point_against_llava_at_r1(tmp_path):
    point = {"setting": "s", "views": 1, "visual_positions": 576, "visual_kv_mb": 1.0}
    result = {
        "command": "x",
        "repeats": 3,
        "wall_time_s": 60,
        "machine": MACHINE,
        "points": [
            {**point, "architecture": "llava", "keep_ratio": 1.0, "prefill_tflops": 2.0, "ttft_s": 1.0},
            {**point, "architecture": "saisa", "keep_ratio": 0.25, "prefill_tflops": 0.5, "ttft_s": None},
        ],
    }
    text = views_efficiency.markdown(result)
    assert "| s | saisa | 0.25 | 576 | 0.500 | 0.25 | 1.0 | - |" in text
    views_efficiency.plot(result, tmp_path / "views.png")


def test_score_layer_sweep_reads_each_point_against_r1(tmp_path):
    points = [
        {**_point(arch, ratio, accuracy), "score_layer": layer}
        for arch, ratio, layer, accuracy in [
            ("saisa", 1.0, None, 0.40),
            ("saisa", 0.25, 2, 0.20),
            ("saisa", 0.25, 24, 0.385),
            ("llava", 1.0, None, 0.5),
            ("llava", 0.25, 2, 0.45),
        ]
    ]
    result = {"task": "easy-VQA", "seed": 0, "learning_rate": 1e-4, "keep_ratio": 0.25, "layers": 30}
    result.update(command="x", wall_time_s=60, machine=MACHINE, points=points)
    text = pruning_accuracy.sweep_markdown(result)
    assert "| saisa | 24 | 38.5% | -1.5 | 0.0025 |" in text and "| llava | 2 | 45.0% | -5.0 |" in text
    assert "| saisa | - (r = 1) | 40.0% | +0.0 | 0.0100 |" in text
    pruning_accuracy.sweep_plot(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
