"""BENCHMARKS.md is what `make bench` renders from its recorded measurements, with every row filled.

No timing happens here: these tests re-render the committed bench/results.json and bench/gpu_check.json.
"""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_report  # noqa: E402

RESULTS = json.loads((ROOT / "bench" / "results.json").read_text())
GPU = json.loads((ROOT / "bench" / "gpu_check.json").read_text())


def test_committed_report_is_the_rendering_of_the_committed_measurements():
    rendered = bench_report.render(RESULTS, GPU)
    committed = (ROOT / "BENCHMARKS.md").read_text()
    assert rendered.strip() == committed.strip(), "BENCHMARKS.md is out of date: `python tools/bench_report.py --render`"


def test_every_row_is_measured_with_machine_and_rerun_command():
    md = bench_report.render(RESULTS, GPU)
    for key, (title, *_rest, cmd) in bench_report.SECTIONS.items():
        assert key in RESULTS, f"no measurements for {key}"
        section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert "Not measured" not in section, title
        assert "cores, torch" in section and f"`{cmd}`" in section, f"{title}: machine or rerun command missing"
    gpu = md.split("## GPU", 1)[1]
    assert "Device: NVIDIA" in gpu and "blockwise" in gpu, "the GPU rows come from a real `make gpu-check` run"


def test_sections_report_medians_with_spread_and_agreement():
    assert RESULTS["course"]["repeats"] >= 3 and all(r["score"] == r["max"] for r in RESULTS["course"]["rows"])
    assert len(RESULTS["training"]["seeds"]) >= 3
    assert set(RESULTS["training"]["runs"]) == {"fp32", "bf16-autocast", "fp8-emulated"}
    moe = bench_report.render(RESULTS, GPU).split("## MoE", 1)[1].split("\n## ", 1)[0]
    assert "outputs agree: **True**" in moe, "a ratio is only reported when the outputs agree"
