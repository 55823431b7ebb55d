"""Course driver: releases, solutions, sample submissions, autograding, grade tables, self-check.

    python tools/course.py release [SECTION ...]     source/ -> release/ (nbgrader generate_assignment)
    python tools/course.py solutions [SECTION ...]   source/ -> solutions/ (executed, hidden tests stripped)
    python tools/course.py samples                   submitted/{reference,blank,partial}/
    python tools/course.py autograde [--student S] [SECTION ...]
    python tools/course.py feedback | grades | table
    python tools/course.py demo                      release + samples + autograde + table
    python tools/course.py check NOTEBOOK [--section S]   self-check one notebook on a copy
    python tools/course.py verify SECTION            author's check: solution full marks, blank zero

Every nbgrader step runs as a subprocess of the real ``nbgrader`` command with the course's
``nbgrader_config.py``; work on temporary copies never touches the instructor's gradebook.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.grading import (  # noqa: E402
    BEGIN_SOLUTION,
    END_SOLUTION,
    NotebookScore,
    error_messages,
    read_scores,
)

COURSE_ID = "deepseek-v3-from-scratch"
SAMPLE_STUDENTS = ("reference", "partial", "blank")


def sections(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "source").iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())


def nbgrader_bin() -> str:
    cand = Path(sys.executable).parent / "nbgrader"
    return str(cand) if cand.exists() else "nbgrader"


def grading_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["COURSE_LIB_DIR"] = str(ROOT / "course_lib")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONHASHSEED"] = "0"
    env["COURSE_HEADLESS"] = "1"  # no widget front end while executing: interactive figures render statically
    return env


def run_nbgrader(root: Path, *args: str, quiet: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [nbgrader_bin(), *args, f"--CourseDirectory.root={root}"]
    if quiet:
        cmd.append("--log-level=WARN")
    proc = subprocess.run(cmd, cwd=root, env={**grading_env(root), **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return proc


# ---------------------------------------------------------------- release and solutions


def release(root: Path = ROOT, names: list[str] | None = None) -> None:
    for a in names or sections(root):
        proc = run_nbgrader(root, "generate_assignment", a, "--force")
        if proc.returncode != 0:
            raise SystemExit(f"generate_assignment {a} failed")
        print(f"released {a} -> release/{a}/{a}.ipynb")


def solutions(root: Path = ROOT, names: list[str] | None = None) -> None:
    for a in names or sections(root):
        t0 = time.perf_counter()
        proc = run_nbgrader(root, "generate_solution", a, "--force")
        if proc.returncode != 0:
            raise SystemExit(f"generate_solution {a} failed")
        print(f"solution {a} -> solutions/{a}/{a}.ipynb ({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------- sample submissions


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(nb: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def strip_outputs(nb: dict) -> dict:
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def solution_source(cell: dict) -> str:
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return "\n".join(ln for ln in src.split("\n") if ln.strip() not in (BEGIN_SOLUTION, END_SOLUTION))


def partial_notebook(release_nb: dict, source_nb: dict, fraction: float = 0.5) -> dict:
    """The release with the first ``fraction`` of its exercise cells answered from the source."""
    answers = {
        c["metadata"]["nbgrader"]["grade_id"]: solution_source(c)
        for c in source_nb["cells"]
        if c.get("metadata", {}).get("nbgrader", {}).get("solution")
    }
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in release_nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("solution")]
    keep = set(ids[: max(1, int(len(ids) * fraction))])
    for c in release_nb["cells"]:
        gid = c.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid in keep:
            c["source"] = answers[gid]
    return release_nb


def samples(root: Path = ROOT, names: list[str] | None = None) -> None:
    """submitted/reference (worked solutions), submitted/blank (untouched release), submitted/partial."""
    for a in names or sections(root):
        rel = root / "release" / a / f"{a}.ipynb"
        sol = root / "solutions" / a / f"{a}.ipynb"
        src = root / "source" / a / f"{a}.ipynb"
        ref_nb = strip_outputs(_load(sol if sol.exists() else src))
        _save(ref_nb, root / "submitted" / "reference" / a / f"{a}.ipynb")
        shutil.copy(rel, _mk(root / "submitted" / "blank" / a / f"{a}.ipynb"))
        _save(partial_notebook(_load(rel), _load(src)), root / "submitted" / "partial" / a / f"{a}.ipynb")
    print("samples: submitted/{reference,partial,blank}/ for", ", ".join(names or sections(root)))


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- autograde and reports


@dataclass
class GradeRun:
    student: str
    section: str
    seconds: float
    ok: bool
    log: str


def submissions(root: Path, students: list[str] | None = None, names: list[str] | None = None) -> list[tuple[str, str]]:
    sub = root / "submitted"
    if not sub.exists():
        return []
    out = []
    for sdir in sorted(p for p in sub.iterdir() if p.is_dir()):
        if students and sdir.name not in students:
            continue
        for adir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            if names and adir.name not in names:
                continue
            out.append((sdir.name, adir.name))
    return out


def timing_file(root: Path, student: str, a: str) -> Path:
    return root / "autograded" / ".timing" / f"{student}__{a}.json"


def execution_seconds(root: Path, student: str, a: str) -> float | None:
    """Seconds from the setup cell to the last cell of the latest grading run (None if unknown)."""
    path = timing_file(root, student, a)
    if not path.exists():
        return None
    t = json.loads(path.read_text())
    return t["end"] - t["start"]


def autograde_one(root: Path, student: str, a: str) -> GradeRun:
    tfile = timing_file(root, student, a)
    tfile.parent.mkdir(parents=True, exist_ok=True)
    tfile.unlink(missing_ok=True)
    env = {"COURSE_TIMING_FILE": str(tfile), "COURSE_BENCH_LOCK": str(root / "autograded" / ".timing" / "bench.lock")}
    t0 = time.perf_counter()
    proc = run_nbgrader(root, "autograde", a, "--student", student, "--force", env=env)
    if proc.returncode != 0 and "database is locked" in proc.stdout + proc.stderr:
        proc = run_nbgrader(root, "autograde", a, "--student", student, "--force", env=env)
    dt = time.perf_counter() - t0
    return GradeRun(student, a, dt, proc.returncode == 0, proc.stdout + proc.stderr)


def autograde(
    root: Path = ROOT, students: list[str] | None = None, names: list[str] | None = None, workers: int | None = None
) -> list[GradeRun]:
    """Autograde every submission; ``workers`` notebooks at a time (benchmarks never overlap: see bench.exclusive)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = submissions(root, students, names)
    workers = workers or int(os.environ.get("COURSE_GRADE_WORKERS", min(2, os.cpu_count() or 1)))
    runs = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for run in pool.map(lambda sa: autograde_one(root, *sa), todo):
            ex = execution_seconds(root, run.student, run.section)
            note = "" if run.ok else " (FAILED: see log)"
            timing = f" (notebook {ex:.0f} s)" if ex is not None else ""
            print(f"autograded {run.student}/{run.section} in {run.seconds:.0f} s{timing}{note}", flush=True)
            runs.append(run)
    return runs


def scores(root: Path, student: str, a: str) -> NotebookScore:
    db = f"sqlite:///{root / 'gradebook.db'}"
    return read_scores(db, COURSE_ID, a, student, root / "autograded" / student / a / f"{a}.ipynb")


def table(root: Path = ROOT, students: list[str] | None = None) -> str:
    subs = submissions(root, students)
    rank = {s: i for i, s in enumerate(SAMPLE_STUDENTS)}
    studs = sorted({s for s, _ in subs}, key=lambda s: (rank.get(s, len(rank)), s))
    names = sections(root)
    w = max([len("student")] + [len(s) for s in studs]) + 2
    cols = [max(len(a), 11) + 2 for a in names]
    lines = ["student".ljust(w) + "".join(a.rjust(c) for a, c in zip(names, cols)) + "total".rjust(14)]
    for s in studs:
        row, tot, mx = s.ljust(w), 0.0, 0.0
        for a, c in zip(names, cols):
            if (s, a) in subs and (root / "autograded" / s / a).exists():
                sc = scores(root, s, a)
                row += f"{sc.score:g}/{sc.max_score:g}".rjust(c)
                tot, mx = tot + sc.score, mx + sc.max_score
            else:
                row += "-".rjust(c)
        lines.append(row + f"{tot:g}/{mx:g}".rjust(14))
    return "\n".join(lines)


def feedback(root: Path = ROOT) -> None:
    for student, a in submissions(root):
        run_nbgrader(root, "generate_feedback", a, "--student", student, "--force")
    print("feedback -> feedback/STUDENT/SECTION/SECTION.html")


def grades(root: Path = ROOT) -> None:
    run_nbgrader(root, "export", "--to", str(root / "grades.csv"))
    print(f"grades -> {root / 'grades.csv'}")


def demo(root: Path = ROOT) -> None:
    t0 = time.perf_counter()
    release(root)
    samples(root)
    runs = autograde(root)
    print()
    print(table(root))
    print(f"\ndemo: {len(runs)} notebooks autograded in {time.perf_counter() - t0:.0f} s")
    bad = [r for r in runs if not r.ok]
    if bad:
        raise SystemExit("autograde failed for: " + ", ".join(f"{r.student}/{r.section}" for r in bad))


# ---------------------------------------------------------------- temporary course copies


def temp_course(names: list[str]) -> Path:
    """A throw-away course directory holding the config and the given sections' source notebooks."""
    tmp = Path(tempfile.mkdtemp(prefix="course-"))
    shutil.copy(ROOT / "nbgrader_config.py", tmp / "nbgrader_config.py")
    for a in names:
        shutil.copytree(ROOT / "source" / a, tmp / "source" / a, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return tmp


def infer_section(nb_path: Path) -> str:
    names = sections()
    for a in names:
        if a in nb_path.name or a in str(nb_path.parent.name):
            return a
    try:
        ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in _load(nb_path)["cells"]}
    except (json.JSONDecodeError, KeyError):
        ids = set()
    for a in names:
        src_ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in _load(ROOT / "source" / a / f"{a}.ipynb")["cells"]}
        if len(ids & src_ids - {None}) >= 3:
            return a
    raise SystemExit(f"cannot tell which section {nb_path} belongs to: pass SECTION=<one of {' '.join(names)}>")


def print_report(sc: NotebookScore, seconds: float | None = None) -> None:
    head = f"{sc.section} / {sc.student}: {sc.score:g} / {sc.max_score:g} points"
    print(head + (f"  (graded in {seconds:.0f} s)" if seconds is not None else ""))
    for c in sc.cells:
        mark = "ok  " if c.score >= c.max_score else ("part" if c.score > 0 else "FAIL")
        print(f"  [{mark}] {c.grade_id:<40} {c.score:g}/{c.max_score:g}")
        if c.message and c.score < c.max_score:
            print(f"         {c.message[:400]}")
    for p in sc.problems:
        print(f"  problem: {p}")


def check(nb_path: Path, section: str | None = None) -> NotebookScore:
    """Grade one notebook against the hidden tests on a copy; print the report and the feedback path."""
    nb_path = nb_path.resolve()
    if not nb_path.exists():
        raise SystemExit(f"no such notebook: {nb_path}")
    a = section or infer_section(nb_path)
    tmp = temp_course([a])
    try:
        run_nbgrader(tmp, "generate_assignment", a, "--force")
        dest = _mk(tmp / "submitted" / "self" / a / f"{a}.ipynb")
        shutil.copy(nb_path, dest)
        run = autograde_one(tmp, "self", a)
        run_nbgrader(tmp, "generate_feedback", a, "--student", "self", "--force")
        sc = scores(tmp, "self", a)
        print_report(sc, run.seconds)
        fb = tmp / "feedback" / "self" / a / f"{a}.html"
        if fb.exists():
            out = _mk(ROOT / "feedback" / "self-check" / a / f"{a}.html")
            shutil.copy(fb, out)
            print(f"feedback: {out}")
        return sc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(a: str, keep: bool = False) -> int:
    """Author's check: the source notebook scores full marks, the untouched release scores zero."""
    tmp = temp_course([a])
    status = 0
    try:
        proc = run_nbgrader(tmp, "generate_assignment", a, "--force")
        if proc.returncode:
            print(proc.stdout, proc.stderr)
            return 1
        shutil.copy(tmp / "release" / a / f"{a}.ipynb", _mk(tmp / "submitted" / "blank" / a / f"{a}.ipynb"))
        _save(strip_outputs(_load(tmp / "source" / a / f"{a}.ipynb")), tmp / "submitted" / "reference" / a / f"{a}.ipynb")
        for student in ("reference", "blank"):
            run = autograde_one(tmp, student, a)
            sc = scores(tmp, student, a)
            print_report(sc, run.seconds)
            ex = execution_seconds(tmp, student, a)
            if ex is not None:
                print(f"  notebook execution: {ex:.1f} s (budget 90 s)")
                if ex > 90:
                    status = 1
                    print("  !! over the 90 s budget")
            if student == "reference" and sc.score < sc.max_score:
                status = 1
            if student == "blank" and sc.score > 0:
                status = 1
                print("  !! the untouched release must score 0")
            graded = tmp / "autograded" / student / a / f"{a}.ipynb"
            if graded.exists():
                errs = error_messages(graded)
                noisy = [g for g, m in errs.items() if "wrote to stderr" in m]
                if noisy and student == "reference":
                    print("  !! graded cells wrote to stderr:", ", ".join(noisy))
                    status = 1
            print()
        if keep:
            print(f"kept {tmp}")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("verify:", "PASS" if status == 0 else "FAIL")
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("release", "solutions", "samples"):
        p = sub.add_parser(name)
        p.add_argument("sections", nargs="*")
    p = sub.add_parser("autograde")
    p.add_argument("--student", action="append")
    p.add_argument("sections", nargs="*")
    for name in ("feedback", "grades", "table", "demo"):
        sub.add_parser(name)
    p = sub.add_parser("check")
    p.add_argument("notebook", type=Path)
    p.add_argument("--section")
    p = sub.add_parser("verify")
    p.add_argument("section")
    p.add_argument("--keep", action="store_true")
    ns = ap.parse_args(argv)
    if ns.cmd == "release":
        release(ROOT, ns.sections or None)
    elif ns.cmd == "solutions":
        solutions(ROOT, ns.sections or None)
    elif ns.cmd == "samples":
        samples(ROOT, ns.sections or None)
    elif ns.cmd == "autograde":
        runs = autograde(ROOT, ns.student, ns.sections or None)
        print(table(ROOT))
        return 0 if all(r.ok for r in runs) else 1
    elif ns.cmd == "feedback":
        feedback(ROOT)
    elif ns.cmd == "grades":
        grades(ROOT)
    elif ns.cmd == "table":
        print(table(ROOT))
    elif ns.cmd == "demo":
        demo(ROOT)
    elif ns.cmd == "check":
        check(ns.notebook, ns.section)
    elif ns.cmd == "verify":
        return verify(ns.section, ns.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
