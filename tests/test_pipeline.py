"""The course through real nbgrader, for every section present: `make demo` in a fresh clone, then checks.

- the worked solutions score full marks from the judge;
- the untouched release scores 0 on every graded cell and still executes to the end;
- the half-done `partial` sample lands in between;
- committed release/ equals a fresh generation;
- every graded cell of the autograded notebook shows the judge's report (never the kernel's output);
  every notebook executes within 90 s, judging included.
"""

from __future__ import annotations

import course
import pytest
from conftest import ROOT, file_digest, graded_cells, load_nb, section_names

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("pipeline")]
SECTIONS = section_names()
BUDGET_S = 90.0


def test_demo_prints_grade_table(demo_run):
    out = demo_run["stdout"]
    assert "student" in out and "total" in out, out[-3000:]
    for a in SECTIONS:
        assert a in out, f"{a} missing from the grade table"
    for s in ("reference", "blank", "partial"):
        assert any(line.startswith(s) for line in out.splitlines()), f"no row for {s}"


@pytest.mark.parametrize("section", SECTIONS)
def test_reference_scores_full_marks(demo_run, section):
    sc = course.scores(demo_run["root"], "reference", section)
    failed = [(c.grade_id, c.message) for c in sc.cells if c.score < c.max_score]
    assert sc.max_score > 0
    assert not failed, f"worked solution lost points in {section}: {failed}"


@pytest.mark.parametrize("section", SECTIONS)
def test_blank_release_scores_zero_and_runs_to_the_end(demo_run, section):
    root = demo_run["root"]
    sc = course.scores(root, "blank", section)
    scored = [(c.grade_id, c.score) for c in sc.cells if c.score > 0]
    assert not scored, f"the untouched release of {section} earned points: {scored}"
    nb = load_nb(root / "autograded" / "blank" / section / f"{section}.ipynb")
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and not c.get("metadata", {}).get("nbgrader", {}).get("grade")]
    assert all(c.get("execution_count") for c in code), "some cells of the blank release never executed"
    errors = [c for c in code if any(o.get("output_type") == "error" and o.get("ename") == "CellTimeoutError" for o in c["outputs"])]
    assert not errors, "a cell of the blank release timed out"


def test_partial_lands_between(demo_run):
    root = demo_run["root"]
    partial = [a for a in SECTIONS if (root / "autograded" / "partial" / a).exists()]
    assert partial, "no partial sample was graded"
    some_between = False
    for a in partial:
        sc = course.scores(root, "partial", a)
        assert sc.score < sc.max_score, f"partial/{a} got full marks"
        some_between |= 0 < sc.score
    assert some_between, "no partial sample earned any points"


@pytest.mark.parametrize("section", SECTIONS)
def test_notebook_within_time_budget(demo_run, section):
    seconds = course.execution_seconds(demo_run["root"], "reference", section)
    assert seconds is not None, "the grader recorded no execution time"
    print(f"{section}: executed in {seconds:.1f} s while graded")
    assert seconds <= BUDGET_S, f"{section} took {seconds:.0f} s to execute (budget {BUDGET_S:.0f} s)"


@pytest.mark.parametrize("section", SECTIONS)
def test_graded_cells_show_the_judges_report(demo_run, section):
    for student in ("reference", "blank"):
        nb = load_nb(demo_run["root"] / "autograded" / student / section / f"{section}.ipynb")
        for c in graded_cells(nb):
            outs = c.get("outputs", [])
            text = "".join("".join(o.get("text", "")) for o in outs)
            gid = c["metadata"]["nbgrader"]["grade_id"]
            assert len(outs) == 1 and text.startswith("Graded by the judge:"), f"{student}/{gid}: {text[:300]!r}"
            assert c.get("execution_count") is None, f"{student}/{gid} was executed in the kernel"


@pytest.mark.parametrize("section", SECTIONS)
def test_committed_release_equals_fresh_generation(demo_run, section):
    fresh_path = demo_run["root"] / "release" / section / f"{section}.ipynb"
    committed_path = ROOT / "release" / section / f"{section}.ipynb"
    # Compare digests, never the bytes: pytest's diff of two large notebooks can run for many minutes.
    if file_digest(fresh_path) == file_digest(committed_path):
        return
    fresh, committed = load_nb(fresh_path)["cells"], load_nb(committed_path)["cells"]
    first = next((i for i, (a, b) in enumerate(zip(fresh, committed)) if a != b), min(len(fresh), len(committed)))
    pytest.fail(f"release/{section} is stale (first difference at cell {first}; {len(fresh)} vs {len(committed)} cells): "
                "run `make release` and commit it")

