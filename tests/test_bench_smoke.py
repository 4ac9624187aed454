"""The benchmark and FLOPs commands run and write their files (smoke tests: nothing here is timed)."""

from __future__ import annotations

import json

from saisa.cli import main

TINY = [
    "--hidden",
    "64",
    "--ffn",
    "128",
    "--layers",
    "2",
    "--heads",
    "4",
    "--vocab",
    "256",
    "--text-tokens",
    "8",
    "--visual-tokens",
    "16",
    "--decode-tokens",
    "2",
    "--repeats",
    "1",
]


def test_bench_writes_json_and_png(tmp_path):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["results"]) == {"saisa", "llava", "hf-llava"}
    assert report["results"]["saisa"]["peak_prefill_bytes"] is not None
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_image_cache_bench_reports_a_ratio_and_hits(tmp_path):
    assert main(["bench", *TINY, "--image-cache", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "image_cache_vision1x64.json").read_text())["result"]
    assert result["repeat_over_cold"] > 0 and result["cache"]["hits"] >= 1


def test_flops_cli_writes_report_and_plot(tmp_path):
    assert (
        main(["flops", "--preset", "vicuna-7b", "--json", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png")])
        == 0
    )
    report = json.loads((tmp_path / "f.json").read_text())
    saved = 1 - report["prefill"]["saisa"]["total"] / report["prefill"]["llava"]["total"]
    assert abs(saved - 0.665) < 0.01 and (tmp_path / "f.png").exists()
