"""Grading throughput and per-notebook time breakdown of `make autograde` on one batch.

    python tools/grading_bench.py [--section 01_foundations|02_mla,03_moe|all] [--students 6] [--setups local1,local2,nodes]
                                  [--out bench/grading_dask.json]

Builds a throw-away course with the section released and ``--students`` submissions (the sample reference /
partial / blank notebooks, cycled), then grades the same batch once per setup (``--force``, so nothing is
skipped) and prints, per setup, submissions/minute and the median time per submission split into: staging (the
batch's own copy and scan), nbgrader start-up (process start to the first kernel request), kernel start (the
sandbox and ipykernel up to the first cell), execution (first cell to last, the judge included), and what is
left (nbgrader's work after the last cell: the kernel's shutdown (also shown alone), writing the notebook and gradebook, the record).
With several sections (``all``: the six), each student submits every one of them, and the figures add the median
student's whole submission (``student_total_s``, ``student_outside_execution_s``).

Setups: ``localN`` = the embedded LocalCluster with N grading slots; ``nodes`` = a ``dask scheduler`` CLI process
and two ``dask worker`` CLI processes of one slot each (separate local directories), reached through
``COURSE_DASK_SCHEDULER``; ``poolN`` = the batch's in-process fallback (``COURSE_DASK=off``). Run it on an idle
machine for absolute figures; ratios between setups of one run are what it is for on a shared one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import course  # noqa: E402


def make_batch(sections: list[str], students: int) -> Path:
    root = course.temp_course(sections)
    for section in sections:
        proc = course.run_nbgrader(root, "generate_assignment", section, "--force")
        if proc.returncode:
            raise SystemExit(proc.stdout + proc.stderr)
    course.samples(root, sections)
    kinds = list(course.SAMPLE_STUDENTS)
    for i in range(students):
        for section in sections:
            src = root / "submitted" / kinds[i % len(kinds)] / section
            shutil.copytree(src, root / "submitted" / f"s{i:03d}" / section)
    for k in kinds:
        shutil.rmtree(root / "submitted" / k)
    return root


def breakdown(records: list) -> dict:
    rows = [r for r in records if r.status == "graded" and not r.skipped]
    if not rows:
        return {}

    def mean(key) -> float:  # the median: the first submission of each worker also starts its fork server
        vals = [key(r) for r in rows]
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 2) if vals else float("nan")

    t = {
        "total_s": mean(lambda r: r.seconds),
        "staging_s": mean(lambda r: r.timing.get("staging_s")),
        "nbgrader_start_s": mean(lambda r: r.timing.get("nbgrader_start_s")),
        "kernel_start_s": mean(lambda r: r.timing.get("kernel_start_s")),
        "sandbox_setup_s": mean(lambda r: r.timing.get("sandbox_setup_s")),
        "view_s": mean(lambda r: r.timing.get("view_s")),
        "shutdown_s": mean(lambda r: r.timing.get("shutdown_s")),
        "after_s": mean(lambda r: r.timing.get("after_s")),
        "execution_s": mean(lambda r: r.timing.get("execution_s")),
        "judge_s": mean(lambda r: r.timing.get("judge_s")),
        "channel_s": mean(lambda r: r.timing.get("channel_s")),
    }
    t["outside_execution_s"] = round(t["total_s"] - t["execution_s"], 2)
    sections = {r.section for r in rows}
    if len(sections) > 1:  # one student's whole submission: the sums over its notebooks, median over students
        per = {}
        for r in rows:
            tot, ex = per.get(r.student, (0.0, 0.0))
            per[r.student] = (tot + r.seconds, ex + (r.timing.get("execution_s") or 0.0))
        whole = [v for k, v in per.items() if sum(1 for r in rows if r.student == k) == len(sections)]
        if whole:
            t["student_total_s"] = round(statistics.median(v[0] for v in whole), 2)
            t["student_outside_execution_s"] = round(statistics.median(v[0] - v[1] for v in whole), 2)
    return t


def run_setup(root: Path, setup: str, sections: list[str]) -> dict:
    env_before = dict(os.environ)
    cluster = None
    try:
        if setup.startswith("pool"):
            os.environ["COURSE_DASK"] = "off"
            workers = int(setup[4:] or 1)
        elif setup.startswith("local"):
            os.environ.pop("COURSE_DASK_SCHEDULER", None)
            workers = int(setup[5:] or 1)
        elif setup == "nodes":
            from dask_nodes import CliCluster

            cluster = CliCluster(root / ".nodes", workers=2, slots=1, port=18791)
            os.environ["COURSE_DASK_SCHEDULER"] = cluster.address
            workers = 2
        else:
            raise SystemExit(f"unknown setup {setup!r}")
        t0 = time.perf_counter()
        recs = course.batch(root, names=sections, workers=workers, force=True)
        wall = time.perf_counter() - t0
    finally:
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(env_before)
    graded = [r for r in recs if r.status == "graded"]
    summary = json.loads((root / "autograded" / "summary.json").read_text())
    return {"setup": setup, "workers": workers, "submissions": len(recs), "graded": len(graded), "wall_s": round(wall, 1),
            "submissions_per_minute": round(summary["submissions_per_minute"], 2), "per_submission": breakdown(recs),
            "scores": {r.student: r.score for r in recs},
            "rows": [{"student": r.student, "section": r.section, "seconds": round(r.seconds, 2), **r.timing} for r in recs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="01_foundations", help="a section, several separated by commas, or all")
    ap.add_argument("--students", type=int, default=6)
    ap.add_argument("--setups", default="local1,local2,nodes")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()
    sections = course.sections() if ns.section == "all" else ns.section.split(",")
    root = make_batch(sections, ns.students)
    load = os.getloadavg()
    results = []
    try:
        for setup in ns.setups.split(","):
            res = run_setup(root, setup, sections)
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k not in ("scores", "rows")}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"section": ns.section, "students": ns.students, "cpus": os.cpu_count(), "load_before": load,
           "load_after": os.getloadavg(), "results": results}
    print(json.dumps(out, indent=1))
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
