"""Hostile submissions against the judge (tests/hostile_corpus.py), graded as an instructor and a self-learner would.

One temporary course, Section 1: every case in one `tools/course.py autograde` batch (two workers, sandboxed),
feedback pages generated, and the cases marked `check` graded again with `tools/course.py check`. Each case must
score what the honest part of its code deserves, however it tampers with its kernel; a person is asked to look
where the summary should draw their eye; no line of the judge ever reaches a learner's output or feedback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import course
import hostile_corpus as hc
import pytest

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("hostile")]
ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "course.py"
CASES = {c.name: c for c in hc.cases()}
ENV = {"COURSE_JUDGE_CALL_TIMEOUT": "15", "COURSE_JUDGE_MAX_REPLY_MB": "8", "COURSE_CELL_TIMEOUT": "45", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="session")
def hostile():
    root = course.temp_course([hc.SECTION])
    env = {**os.environ, **ENV}
    try:
        proc = course.run_nbgrader(root, "generate_assignment", hc.SECTION, "--force")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        hc.build(root)
        batch = subprocess.run([sys.executable, str(TOOLS), "--root", str(root), "autograde"], env=env,
                               capture_output=True, text=True, timeout=3000)
        feedback = subprocess.run([sys.executable, str(TOOLS), "--root", str(root), "feedback"], env=env,
                                  capture_output=True, text=True, timeout=1200)
        summary = json.loads((root / "autograded" / "summary.json").read_text())
        checks = {}
        for name, case in CASES.items():
            if case.check:
                nb = root / "submitted" / name / hc.SECTION / f"{hc.SECTION}.ipynb"
                out = subprocess.run([sys.executable, str(TOOLS), "check", str(nb), "--section", hc.SECTION], env=env,
                                     capture_output=True, text=True, timeout=900)
                checks[name] = out.stdout + out.stderr
        yield {"root": root, "batch": batch, "feedback": feedback, "checks": checks,
               "records": {r["student"]: r for r in summary["submissions"]}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_batch_finishes_and_grades_the_good_submission(hostile):
    recs = hostile["records"]
    assert set(CASES) | {"good"} <= set(recs), f"missing: {sorted(set(CASES) | {'good'} - set(recs))}\n{hostile['batch'].stdout[-3000:]}"
    assert recs["good"]["score"] == hc.FULL and not recs["good"]["review"], recs["good"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_scores_what_its_honest_code_deserves(hostile, name):
    case, rec = CASES[name], hostile["records"][name]
    detail = "; ".join(f"{d['kind']}: {d['detail']}" for d in rec["diagnoses"])
    assert rec["score"] == pytest.approx(case.score), f"{name}: {rec['score']} points, expected {case.score} ({detail})"
    assert rec["max_score"] == pytest.approx(hc.FULL)
    assert rec["review"] == case.review, f"{name}: review={rec['review']} ({detail})"
    kinds = {d["kind"] for d in rec["diagnoses"]}
    assert case.kinds <= kinds, f"{name}: diagnoses {sorted(kinds)} lack {sorted(case.kinds - kinds)}"


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.check))
def test_make_check_agrees_with_the_batch(hostile, name):
    out = hostile["checks"][name]
    m = re.search(rf"{hc.SECTION} / self: ([\d.]+) / ([\d.]+) points", out)
    assert m, out[-2000:]
    assert float(m.group(1)) == pytest.approx(CASES[name].score), out[-2000:]


def _judge_lines() -> set[str]:
    """Lines of the judge a learner never sees: in course_judge/, in no release or worked-solution notebook."""
    public = set()
    for folder in ("release", "solutions"):
        for nb in (ROOT / folder).rglob("*.ipynb"):
            for c in json.loads(nb.read_text())["cells"]:
                src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                public |= {ln.strip() for ln in src.splitlines()}
    seen = "\n".join(public)  # a judge line inside a released line (``W = ...`` in ``_W = ...``) is public too
    lines = set()
    for f in (ROOT / "course_judge").rglob("*.py"):
        for ln in f.read_text().splitlines():
            ln = ln.strip()
            if len(ln) >= 30 and not ln.startswith(("#", '"""')) and ln not in seen:
                lines.add(ln)
    return lines


def _readable_by_the_kernel(candidates: set[str]) -> set[str]:
    """The candidates that are lines of code the kernel may read anyway: course_lib (its own package), the standard
    library and the installed packages (``import`` lines, ``super().__init__(...)``). Searched only on a hit."""
    import sysconfig

    roots = [ROOT / "course_lib", *{Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")}]
    found: set[str] = set()
    for top in roots:
        for f in top.rglob("*.py"):
            if "course_judge" in f.parts:
                continue
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            found |= {c for c in candidates - found if c in text}
            if found == candidates:
                return found
    return found


def test_no_line_of_the_judge_reaches_any_output_or_feedback(hostile):
    root = hostile["root"]
    pages = list((root / "autograded").rglob("*.ipynb")) + list((root / "feedback").rglob("*.html"))
    assert len(list((root / "feedback").rglob("*.html"))) >= len(CASES) - 2, hostile["feedback"].stdout[-2000:]
    lines = _judge_lines()
    hits = {}
    for page in pages:
        found = {ln for ln in lines if ln in page.read_text(errors="replace")}
        # a line of the learner's own submission is theirs, even where the judge happens to have the same line
        # (``T, S = q.shape[-2], k.shape[-2]``); staging copies of submissions are checked the same way
        case = next((p for p in page.relative_to(root).parts[1:] if (root / "submitted" / p).is_dir()), None)
        if case is not None and found:
            own = "".join(f.read_text(errors="replace") for f in (root / "submitted" / case).rglob("*.ipynb"))
            found = {ln for ln in found if ln not in own}
        hits[page] = found
    # a page that dumps what the kernel holds (linecache, frames) shows generic lines the judge shares with code the
    # kernel can read anyway; only the judge's own lines are a leak
    generic = _readable_by_the_kernel(set().union(*hits.values()))
    for page, found in hits.items():
        leaked = sorted(found - generic)
        assert not leaked, f"{page.relative_to(root)} quotes the judge: {leaked[:3]}"


def test_forged_replies_and_outputs_change_nothing(hostile):
    """Printed verdicts, forged channel replies and fake agents in the kernel are data, never a verdict."""
    nb = json.loads((hostile["root"] / "autograded" / "forged_output" / hc.SECTION / f"{hc.SECTION}.ipynb").read_text())
    texts = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert hc.FORGED_VERDICT in texts  # the forgery is shown as the learner's own output ...
    assert hostile["records"]["forged_output"]["score"] == CASES["forged_output"].score  # ... and counts for nothing
