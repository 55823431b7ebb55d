"""`make gpu-check` without a GPU: its CPU dry run (tiny shapes, every check, the fused kernels through Triton's
interpreter) must finish without an error, and `make bench` must render its end-to-end rows.

The GPU budget is one short run, so a silly bug in tools/gpu_check.py or tools/gpu_e2e.py has to show up here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bench_report
import gpu_e2e
import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script enables the interpreter itself
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run-cpu", "--no-pytest", "--reps", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    data = json.loads(out.read_text())
    data["_proc"] = {"rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-4000:]}
    return data


def test_dry_run_runs_every_check_without_error(dry_run):
    assert dry_run["dry_run_cpu"] and dry_run["triton_interpreter"], "the dry run must take the fused kernels through the interpreter"
    bad = [(c["name"], c["status"], c.get("message")) for c in dry_run["checks"] if c["status"] not in ("ok",)]
    assert not bad, f"{bad}\n{dry_run['_proc']['tail']}"
    assert dry_run["_proc"]["rc"] == 0, dry_run["_proc"]["tail"]
    names = {c["name"] for c in dry_run["checks"]}
    missing = set(gpu_e2e.NAMES.values()) - names
    assert not missing, f"end-to-end checks not run: {missing}"


def test_dry_run_rows_hold_what_the_report_needs(dry_run):
    checks = {c["name"]: c for c in dry_run["checks"]}
    bits = checks[gpu_e2e.NAMES["quantiser_bits"]]
    assert all(r["precise_div"]["codes_differing"] == 0 and r["precise_div"]["scales_differing"] == 0 for r in bits["cases"].values())
    assert {"tiles bf16", "blocks", "re-tiled FP8 x^T"} <= set(bits["cases"])
    lin = checks[gpu_e2e.NAMES["fp8_linear"]]["rows"][0]
    assert set(lin["speedup_vs_bf16"]) == {"fp8_fused", "fp8_fused_cached_weight", "fp8_torch_quantisers"}
    assert lin["fp8_vs_bf16_rel_err"] < 0.1, "FP8Linear and the BF16 layer disagree"
    tr = checks[gpu_e2e.NAMES["training"]]
    assert len(tr["losses"]["fp8"]) == len(tr["losses"]["bf16"]) == tr["steps"]
    moe = checks[gpu_e2e.NAMES["moe_dispatch"]]
    assert all(moe["agree"].values()) and {"per_expert_loop", "sorted", "grouped_mm", "hf_eager"} <= set(moe["ms"]), moe.get("notes")
    mla = checks[gpu_e2e.NAMES["mla_decode"]]
    assert [r["T"] for r in mla["rows"]] == [64, 128] and all(r["rel_diff"] < 1e-4 for r in mla["rows"])


def test_report_renders_the_dry_run_rows_and_marks_unmeasured_ones(dry_run):
    md = "\n".join(gpu_e2e.render_markdown(dry_run))
    for title in gpu_e2e.TITLES.values():
        section = md.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
        assert "CPU dry run" in section and "| " in section, f"{title} not rendered:\n{section}"
    assert "Not measured yet" not in md
    old = "\n".join(gpu_e2e.render_markdown({"cuda": True, "checks": [], "environment": {"device": "NVIDIA H100"}}))
    assert old.count("Not measured yet") == len(gpu_e2e.TITLES)
    committed = bench_report.render(json.loads((ROOT / "bench" / "results.json").read_text()),
                                    json.loads((ROOT / "bench" / "gpu_check.json").read_text()))
    assert "## GPU: end to end" in committed
