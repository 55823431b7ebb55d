"""The instructor's batch against bad submissions (tests/grading_corpus.py), through real nbgrader.

One temporary course, Section 1, ~25 submissions graded by `tools/course.py autograde` in one batch that
is killed halfway (SIGKILL) and resumed, then re-run unchanged, then re-run after one submission
changed. Each bad submission must get the points its code deserves and a diagnosis in the summary;
no other submission nor the gradebook may suffer.
"""

from __future__ import annotations

import csv
import json

import course
import grading_corpus as gc
import pytest

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("corpus")]
NON_ATTACK = [c.name for c in gc.cases(gc.Path("/tmp"), 0, "x") if not c.name.startswith("attack_")]


def _nb(corpus, student) -> dict:
    return json.loads((corpus["root"] / "autograded" / student / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())


def _outputs(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append("".join(o.get("text", "")) if "text" in o else f"{o.get('ename')}: {o.get('evalue')}")
    return "\n".join(parts)


@pytest.mark.parametrize("name", NON_ATTACK)
def test_case_gets_the_grade_its_code_deserves_and_a_diagnosis(graded_corpus, name):
    case = graded_corpus["cases"][name]
    rec = graded_corpus["records"][name]
    kinds = {d["kind"] for d in rec["diagnoses"]}
    detail = "; ".join(f"{d['kind']}: {d['detail']}" for d in rec["diagnoses"])
    assert rec["score"] == pytest.approx(case.score), f"{name}: {rec['score']} points, expected {case.score} ({detail})"
    assert rec["max_score"] == pytest.approx(gc.FULL), f"{name}: max {rec['max_score']} (the gradebook lost cells?)"
    assert case.kinds <= kinds, f"{name}: diagnoses {sorted(kinds)} lack {sorted(case.kinds - kinds)}"
    assert rec["review"] == case.review, f"{name}: review flag {rec['review']} ({detail})"
    for ex in case.lost:  # the exercises the broken code cost, and only those
        got = [v[0] for g, v in rec["cells"].items() if course.exercise_of(g).endswith(ex)]
        assert got and sum(got) == 0, f"{name}: {ex} kept points {got}"
    summary = (graded_corpus["root"] / "autograded" / "summary.md").read_text()
    for d in rec["diagnoses"]:
        assert d["detail"].split(":")[0][:40] in summary, f"{name}: diagnosis missing from summary.md: {d['detail']}"


def test_clean_submissions_have_no_diagnoses(graded_corpus):
    for name in ("good", "blank", "syntax_error"):
        rec = graded_corpus["records"][name]
        assert not [d for d in rec["diagnoses"] if d["kind"] not in ("extra_files",)], (name, rec["diagnoses"])


def test_timeouts_interrupt_only_the_looping_cell(graded_corpus):
    nb = _nb(graded_corpus, "endless_loop")
    loop = next(c for c in nb["cells"] if gc.gid(c) == "ex_01_1_kv_cache")
    assert "CellTimeoutError" in _outputs(loop)
    later = next(c for c in nb["cells"] if gc.gid(c) == "test_01_4_decode_hidden")
    assert "Error" not in _outputs(later), "cells after an interrupted loop must still run"
    wedged = _nb(graded_corpus, "wedged_kernel")
    after = [c for c in wedged["cells"] if gc.gid(c) in ("test_01_4_decode", "test_01_quiz_hidden")]
    assert all("CellNotRun" in _outputs(c) for c in after), "a kernel that ignores interrupts is stopped, later cells not run"


def test_memory_limit_stops_a_huge_allocation(graded_corpus):
    nb = _nb(graded_corpus, "huge_allocation")
    cell = next(c for c in nb["cells"] if gc.gid(c) == "ex_01_2_low_rank")
    assert "allocate memory" in _outputs(cell) or "MemoryError" in _outputs(cell), _outputs(cell)[:500]


def test_output_flood_is_truncated(graded_corpus):
    path = graded_corpus["root"] / "autograded" / "output_flood" / gc.SECTION / f"{gc.SECTION}.ipynb"
    assert path.stat().st_size < 3_000_000, f"flooded notebook is {path.stat().st_size} bytes"
    cell = next(c for c in _nb(graded_corpus, "output_flood")["cells"] if gc.gid(c) == "ex_01_4_decode")
    assert "truncated" in _outputs(cell), "the learner sees that the output was cut"


def test_locked_cells_restored_and_graded_on_the_original_tests(graded_corpus):
    nb = _nb(graded_corpus, "edited_locked")
    vis = next(c for c in nb["cells"] if gc.gid(c) == "test_01_1_sdpa")
    assert "assert_close" in gc.src(vis) and "tests? what tests" not in gc.src(vis)
    hidden = next(c for c in nb["cells"] if gc.gid(c) == "test_01_1_sdpa_hidden")
    assert gc.HIDDEN_SIGNATURE in gc.src(hidden)
    rec = graded_corpus["records"]["edited_locked"]
    assert rec["cells"]["test_01_quiz"][1] == 0.5, "edited points must be restored"
    assert "test_01_4_decode" in rec["cells"], "a test cell un-marked as graded must be graded again"


def test_deleted_and_reordered_cells_are_back_in_release_order(graded_corpus):
    release = json.loads((graded_corpus["root"] / "release" / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())
    want = [gc.gid(c) for c in release["cells"] if gc.gid(c)]
    for student in ("deleted_cells", "reordered_extra_cells", "duplicated_cells"):
        got = [gc.gid(c) for c in _nb(graded_corpus, student)["cells"] if gc.gid(c)]
        assert got == want, f"{student}: graded cells {got}"
    nb = _nb(graded_corpus, "reordered_extra_cells")
    assert any("the end of my notebook" in gc.src(c) for c in nb["cells"]), "the learner's extra cells are kept"


def test_shadow_package_and_helpers_are_the_course_own(graded_corpus):
    nb = _nb(graded_corpus, "shadow_course_lib")
    assert "a submitted torch.py was imported" not in json.dumps(nb)
    assert not (graded_corpus["root"] / "autograded" / "shadow_course_lib" / gc.SECTION / "course_lib").exists()


def test_gradebook_and_grades_csv_match_the_records(graded_corpus):
    root = graded_corpus["root"]
    for student, rec in graded_corpus["records"].items():
        sc = course.scores(root, student, gc.SECTION)
        assert sc.score == pytest.approx(rec["score"]), student
        assert sc.max_score == pytest.approx(gc.FULL), student
    rows = list(csv.DictReader((root / "grades.csv").open()))
    by_student = {r["student_id"]: float(r["score"]) for r in rows if r["assignment"] == gc.SECTION}
    for student, rec in graded_corpus["records"].items():
        assert by_student.get(student) == pytest.approx(rec["score"]), f"grades.csv: {student}"


def test_crash_resume_and_content_hash_skipping(graded_corpus):
    done = graded_corpus["done_before_crash"]
    assert 1 <= len(done) < len(graded_corpus["records"]), f"the batch was not killed mid-way: {done}"
    resume = graded_corpus["resume"]
    assert resume.returncode in (0, 1), resume.stdout[-3000:] + resume.stderr[-3000:]
    skipped = [ln for ln in resume.stdout.splitlines() if "unchanged, skipped" in ln]
    assert {ln.split("/")[0] for ln in skipped} >= {d.split("__")[0] for d in done}, "finished work was redone after the crash"
    rerun = graded_corpus["rerun"].stdout
    lines = [ln for ln in rerun.splitlines() if f"/{gc.SECTION}:" in ln]
    assert lines and all("unchanged, skipped" in ln for ln in lines), rerun[-3000:]
    changed = graded_corpus["changed"].stdout
    regraded = [ln for ln in changed.splitlines() if f"/{gc.SECTION}:" in ln and "unchanged, skipped" not in ln]
    assert [ln.split("/")[0] for ln in regraded] == ["good"], changed[-3000:]
    print(f"\nresume {graded_corpus['resume_seconds']:.0f} s, unchanged re-run {graded_corpus['rerun_seconds']:.0f} s")


def test_lms_zip_collect_then_batch(graded_corpus):
    for student, (score, kinds) in gc.ZIP_EXPECTED.items():
        rec = graded_corpus["records"].get(student)
        assert rec is not None, f"{student} was not collected from the LMS zip"
        assert rec["score"] == pytest.approx(score)
        assert kinds <= {d["kind"] for d in rec["diagnoses"]}


def test_summary_pass_rates_figure_and_throughput(graded_corpus):
    root = graded_corpus["root"]
    summary = graded_corpus["summary"]
    md = (root / "autograded" / "summary.md").read_text()
    assert "submissions/minute" in md and "Per-exercise pass rates" in md and "needed attention" in md
    rows = {r["exercise"]: r for r in summary["exercises"][gc.SECTION]}
    assert set(rows) == {"01_1_sdpa", "01_1_kv_cache", "01_2_low_rank", "01_3_gating", "01_4_decode", "01_quiz"}
    recs = graded_corpus["records"].values()
    full_sdpa = sum(r["cells"].get("test_01_1_sdpa", [0, 1])[0] == 2 and r["cells"].get("test_01_1_sdpa_hidden", [0, 1])[0] == 4
                    for r in recs)
    assert rows["01_1_sdpa"]["full_marks"] == pytest.approx(full_sdpa / len(recs))
    png = root / "autograded" / "score_distribution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for name, case in graded_corpus["cases"].items():
        if case.review:
            assert f"**REVIEW** {name} " in md, f"{name} is not marked for review"
    first = graded_corpus["resume"].stdout
    rate = [ln for ln in first.splitlines() if "submissions/minute" in ln]
    print("\n" + "\n".join(rate))


def _text(html_path) -> str:
    """The feedback page as text: tags (syntax highlighting splits code into spans) removed, entities decoded."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", html_path.read_text()))


def test_feedback_hides_hidden_tests_unless_switched_on(graded_corpus):
    root = graded_corpus["root"]
    student = "edited_locked"  # fails the sdpa hidden test: its traceback would quote hidden lines
    fb = root / "feedback" / student / gc.SECTION / f"{gc.SECTION}.html"
    proc = course.run_nbgrader(root, "generate_feedback", gc.SECTION, "--student", student, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = _text(fb)
    assert "hidden tests ran here" in text
    for secret in (gc.HIDDEN_SIGNATURE, gc.HIDDEN_LINE, "BEGIN HIDDEN"):
        assert secret not in text, f"feedback shows hidden test text {secret!r}"
    assert "AssertionError: output B" in text, "the failure message (written for the learner) stays"
    assert "grading guard" not in text
    proc = course.run_nbgrader(root, "generate_feedback", gc.SECTION, "--student", student, "--force",
                               env={"COURSE_FEEDBACK_SHOW_HIDDEN": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = _text(fb)
    assert gc.HIDDEN_SIGNATURE in shown, "COURSE_FEEDBACK_SHOW_HIDDEN=1 shows the hidden tests"
    tb = "Traceback (most recent call last)"
    assert shown.count(tb) > text.count(tb), "and the tracebacks of failed hidden tests"
    assert shown.count(gc.HIDDEN_LINE) >= 2, "(a traceback quotes the failing hidden line)"
    proc = course.run_nbgrader(root, "generate_feedback", gc.SECTION, "--student", "capture_hidden_source", "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    captured = _text(root / "feedback" / "capture_hidden_source" / gc.SECTION / f"{gc.SECTION}.html")
    assert gc.HIDDEN_SIGNATURE not in captured and "BEGIN HIDDEN" not in captured
