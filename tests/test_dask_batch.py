"""The batch's grading pool on Dask: host resources (a benchmark submission has its host alone), the embedded
LocalCluster against grading without Dask, a scheduler and two worker CLI processes as separate nodes, and a worker
killed in the middle of a grade."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import course
import grading_corpus
import pytest
from dask_nodes import CliCluster

from course_judge import dask_batch

ROOT = Path(__file__).resolve().parents[1]
A = grading_corpus.SECTION  # 01_foundations: the smallest section


# ---------------------------------------------------------------- resources (real Dask, a stand-in task)


def _hold(root: str, student: str, section: str, force: bool) -> dict:
    """A stand-in for grade_task: holds its slot for a while and says when (a real task on a real worker)."""
    t0 = time.time()
    time.sleep(1.0)
    return {"student": student, "section": section, "start": t0, "end": time.time()}


def _nb_with(grade_id: str) -> str:
    return json.dumps({"cells": [{"cell_type": "code", "source": "", "metadata": {"nbgrader": {"grade_id": grade_id}}}]})


def test_a_benchmark_submission_has_its_host_alone_and_others_share_it(tmp_path):
    for a, gid in (("plain", "ex_1"), ("bench", "bench_speed")):
        (tmp_path / "source" / a).mkdir(parents=True)
        (tmp_path / "source" / a / f"{a}.ipynb").write_text(_nb_with(gid))
    assert dask_batch.has_bench_cells(tmp_path / "source" / "bench" / "bench.ipynb")
    assert not dask_batch.has_bench_cells(tmp_path / "source" / "plain" / "plain.ipynb")
    todo = [(f"s{i}", a) for i, a in enumerate(["plain", "plain", "bench", "plain", "plain", "bench", "plain"])]
    got: list[dict] = []
    slots, where = dask_batch.grade_all(tmp_path, todo, False, 2, lambda s, a, res, err: got.append(res or {"err": err}),
                                        task=_hold)
    assert slots == 2 and "LocalCluster" in where
    assert len(got) == len(todo) and all("err" not in g for g in got), got

    def overlap(x: dict, y: dict) -> bool:
        return x["start"] < y["end"] and y["start"] < x["end"]

    for b in (g for g in got if g["section"] == "bench"):
        assert not [o["student"] for o in got if o is not b and overlap(b, o)], "a benchmark submission shared its host"
    plain = [g for g in got if g["section"] == "plain"]
    assert any(overlap(x, y) for i, x in enumerate(plain) for y in plain[i + 1:]), "ordinary submissions never ran side by side"


def test_a_cluster_without_host_resources_is_refused_and_the_batch_still_reports(tmp_path, monkeypatch):
    """Workers that do not advertise ``host`` would leave every task waiting forever: the batch says so and reports."""
    root = tmp_path / "course"
    (root / "source" / A).mkdir(parents=True)
    (root / "submitted" / "ann" / A).mkdir(parents=True)
    (root / "submitted" / "ann" / A / f"{A}.ipynb").write_text("{}")
    monkeypatch.setattr(course, "ensure_assignments", lambda root, names: None)  # no released section needed
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # nbgrader's alembic
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "PYTHONPATH": str(ROOT)}
    port = 18793
    sched = subprocess.Popen([str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = subprocess.Popen([str(Path(sys.executable).parent / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                             "--no-dashboard", "--local-directory", str(tmp_path / "w")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        monkeypatch.setenv(dask_batch.ENV, f"tcp://127.0.0.1:{port}")
        recs = course.batch(root, report=True)
    finally:
        for p in (work, sched):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert [(r.student, r.status) for r in recs] == [("ann", "failed")]
    assert "resource" in recs[0].diagnoses[0]["detail"]
    summary = json.loads((root / "autograded" / "summary.json").read_text())
    assert "grading pool failed" in summary["cluster"]


# ---------------------------------------------------------------- real grading (nbgrader, sandbox) on Dask


def _course(students: dict[str, str]) -> Path:
    """A throw-away course with Section 1 released and ``students`` {name: sample kind} submitted."""
    root = course.temp_course([A])
    proc = course.run_nbgrader(root, "generate_assignment", A, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    course.samples(root, [A])
    for name, kind in students.items():
        if name != kind:
            shutil.copytree(root / "submitted" / kind / A, root / "submitted" / name / A)
    for kind in course.SAMPLE_STUDENTS:
        if kind not in students:
            shutil.rmtree(root / "submitted" / kind)
    return root


def _cells(rec) -> dict:
    return {g: c[:2] for g, c in rec.cells.items()}


def _autograde(root: Path, env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "course.py"), "--root", str(root), "autograde"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.pipeline
def test_local_cluster_grades_as_the_single_machine_flow_does(monkeypatch):
    monkeypatch.delenv(dask_batch.ENV, raising=False)
    root = _course({"reference": "reference", "partial": "partial", "blank": "blank"})
    try:
        recs = {r.student: r for r in course.batch(root, workers=2)}
        assert {s: r.status for s, r in recs.items()} == dict.fromkeys(("reference", "partial", "blank"), "graded")
        assert recs["reference"].score == grading_corpus.FULL and recs["blank"].score == 0
        assert 0 < recs["partial"].score < grading_corpus.FULL
        summary = json.loads((root / "autograded" / "summary.json").read_text())
        assert summary["workers"] == 2 and "LocalCluster" in summary["cluster"] and summary["submissions_per_minute"] > 0
        assert all(s["timing"].get("worker") for s in summary["submissions"])
        # the same submission graded in this process, without Dask (what each pool thread ran before)
        direct = course.grade_submission(root, "partial", A, force=True)
        assert direct.status == "graded" and _cells(direct) == _cells(recs["partial"]) and direct.score == recs["partial"].score
        # resume by content hash: nothing changed, nothing reaches a cluster
        again = course.batch(root, workers=2)
        assert all(r.skipped for r in again) and json.loads((root / "autograded" / "summary.json").read_text())["cluster"] == ""
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.pipeline
def test_two_worker_cli_nodes_behind_a_scheduler(tmp_path):
    root = _course({"reference": "reference", "partial": "partial"})
    nodes = CliCluster(tmp_path / "nodes", workers=2, slots=1, port=18794)
    try:
        proc = _autograde(root, {dask_batch.ENV: nodes.address})
        logs = "\n".join(p.read_text() for p in (tmp_path / "nodes").glob("*.log"))
    finally:
        nodes.close()
        summary = json.loads((root / "autograded" / "summary.json").read_text()) if (root / "autograded" / "summary.json").exists() else {}
        shutil.rmtree(root, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    assert "Dask scheduler tcp://127.0.0.1:18794: 2 workers, 2 grading slots" in proc.stdout
    got = {s["student"]: (s["status"], s["score"], s["timing"]["worker"]) for s in summary["submissions"]}
    assert got["reference"][:2] == ("graded", grading_corpus.FULL) and got["partial"][0] == "graded", got
    assert {w for _, _, w in got.values()} == {"node0", "node1"}, "the two nodes did not share the batch"
    assert summary["workers"] == 2


@pytest.mark.pipeline
def test_a_worker_killed_mid_grade_costs_only_its_submission(tmp_path):
    """The worker grading ``victim`` is SIGKILLed while its sandboxed kernel runs: its grader and sandbox die with it,
    its nanny restarts it, the scheduler gives the submission to a worker again (Dask's allowed-failures), and the
    batch ends with every submission graded as its code deserves and with its reports."""
    import psutil
    from distributed import Client

    root = _course({"victim": "reference", "reference": "reference", "blank": "blank"})
    nodes = CliCluster(tmp_path / "nodes", workers=2, slots=1, port=18795)
    try:
        first = subprocess.Popen([sys.executable, str(ROOT / "tools" / "course.py"), "--root", str(root), "autograde"],
                                 env={**os.environ, dask_batch.ENV: nodes.address}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        killed, graders = None, []
        with Client(nodes.address, timeout=30) as c:
            deadline = time.time() + 900
            while time.time() < deadline and killed is None and first.poll() is None:
                for addr, keys in c.processing().items():
                    if any("grade-victim-" in str(k) for k in keys):
                        pid = c.run(os.getpid, workers=[addr])[addr]
                        kids = psutil.Process(pid).children(recursive=True)
                        if any("bwrap" in k.name() for k in kids):  # its sandboxed kernel is up: mid-grade
                            graders = kids
                            os.kill(pid, signal.SIGKILL)
                            killed = addr
                            break
                time.sleep(0.5)
            out = first.communicate(timeout=1500)[0]
            assert killed is not None, "never caught the victim mid-grade:\n" + out[-3000:]
            time.sleep(2)
            alive = [k.pid for k in graders if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
            assert not alive, f"the killed worker's grader or sandbox processes {alive} kept running"
            assert killed not in c.scheduler_info(n_workers=-1)["workers"], "the killed worker still answers"
    finally:
        nodes.close()
    summary = json.loads((root / "autograded" / "summary.json").read_text())
    csv = (root / "grades.csv").exists()
    shutil.rmtree(root, ignore_errors=True)
    assert first.returncode == 0, out[-3000:]
    got = {s["student"]: (s["status"], s["score"]) for s in summary["submissions"]}
    assert got == {"victim": ("graded", grading_corpus.FULL), "reference": ("graded", grading_corpus.FULL),
                   "blank": ("graded", 0.0)}, out[-3000:]
    assert csv
