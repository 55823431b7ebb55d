"""The instructor's batch against bad submissions (tests/grading_corpus.py), through real nbgrader.

One temporary course, Section 1, ~45 submissions and folders graded by `tools/course.py autograde` in one
batch that is killed halfway (SIGKILL) and resumed, then re-run unchanged, then re-run after two
submissions changed (one into a notebook that used to crash staging). Each bad submission must get the
points its code deserves and a diagnosis in the summary; each refused folder a diagnosis and no
gradebook entry; no other submission, the reports nor the gradebook may suffer.
"""

from __future__ import annotations

import csv
import json

import course
import grading_corpus as gc
import pytest

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("corpus")]
ALL = gc.cases(gc.Path("/tmp"), 0, "x")
NON_ATTACK = [c.name for c in ALL if not c.name.startswith("attack_") and not c.refused]
REFUSED = [c.name for c in ALL if c.refused]


def _nb(corpus, student) -> dict:
    return json.loads((corpus["root"] / "autograded" / student / gc.SECTION / f"{gc.SECTION}.ipynb").read_text())


def _outputs(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append("".join(o.get("text", "")) if "text" in o else f"{o.get('ename')}: {o.get('evalue')}")
    return "\n".join(parts)


@pytest.mark.parametrize("name", NON_ATTACK)
def test_case_gets_the_grade_its_code_deserves_and_a_diagnosis(graded_corpus, name):
    if name not in graded_corpus["cases"]:
        pytest.skip(f"{name} runs only where every kernel gets its own cgroup")
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
    if case.fast:
        assert rec["seconds"] < 10, f"{name}: over a cap, yet {rec['seconds']:.0f} s"
        assert not rec["cells"] or all(v[0] == 0 for v in rec["cells"].values())


@pytest.mark.parametrize("name", REFUSED)
def test_refused_folder_is_never_graded_and_says_why(graded_corpus, name):
    root = graded_corpus["root"]
    case = graded_corpus["cases"][name]
    rec = graded_corpus["refused"].get(case.folder)
    assert rec is not None, f"{case.folder!r} is not among the refused folders: {sorted(graded_corpus['refused'])}"
    kinds = {d["kind"] for d in rec["diagnoses"]}
    assert case.kinds <= kinds and rec["review"], (name, rec["diagnoses"])
    assert case.folder not in graded_corpus["before_regrade"]["students"], "a refused id never enters the gradebook"
    assert case.folder not in graded_corpus["after_regrade"]["students"]
    assert case.folder not in {r["student_id"] for r in csv.DictReader((root / "grades.csv").open())}
    summary = (root / "autograded" / "summary.md").read_text()
    assert "## Refused folders" in summary and rec["diagnoses"][0]["detail"][:40] in summary


def test_reports_stay_files_and_nothing_followed_a_link(graded_corpus):
    root = graded_corpus["root"]
    for name in ("summary.md", "summary.json", "score_distribution.png"):
        assert (root / "autograded" / name).is_file() and not (root / "autograded" / name).is_symlink(), name
    for base in (root / "autograded", root / "autograded" / ".batch" / "staging"):
        assert not [p for p in base.rglob("*") if p.is_symlink()], f"links in {base}"
        assert not list(base.rglob("shadow")) and not list(base.rglob("passwd")), "files behind a link were copied"
    staged = root / "autograded" / ".batch" / "staging" / "symlink_files" / gc.SECTION
    assert sorted(p.name for p in staged.iterdir()) == [f"{gc.SECTION}.ipynb"], "linked files are dropped, the rest graded"


def test_a_regrade_that_crashed_staging_replaces_the_old_grade(graded_corpus):
    root = graded_corpus["root"]
    assert graded_corpus["before_regrade"]["scores"]["regrade_crash"] == pytest.approx(gc.FULL)
    assert graded_corpus["after_regrade"]["scores"]["regrade_crash"] == 0
    rows = {r["student_id"]: float(r["score"]) for r in csv.DictReader((root / "grades.csv").open())}
    assert rows["regrade_crash"] == 0
    assert not (root / "autograded" / "regrade_crash" / gc.SECTION).exists(), "no graded notebook of the old version is left"


def test_memory_bomb_and_fork_hog_stay_in_their_cgroup(graded_corpus):
    if "memory_bomb" not in graded_corpus["cases"]:
        pytest.skip("runs only where every kernel gets its own cgroup")
    limit = int(gc.CORPUS_ENV["COURSE_KERNEL_MEMORY_MB"])
    bomb = graded_corpus["records"]["memory_bomb"]["resources"]
    assert bomb["oom_kills"] >= 1 and bomb["peak_memory_mb"] <= limit + 1, bomb
    print(f"\nmemory bomb: peak {bomb['peak_memory_mb']} MB (limit {limit} MB), {bomb['oom_kills']} processes killed")
    hog = graded_corpus["records"]["fork_hog"]["resources"]
    assert hog["pids_limit_hits"] >= 1 and hog.get("pids_peak", 0) <= hog["pids_limit"], hog
    for name, rec in graded_corpus["records"].items():
        if rec["status"] == "graded":
            assert rec["resources"].get("peak_memory_mb"), f"{name}: no peak memory recorded"
    assert not graded_corpus["leftovers"], f"cgroups or kernel folders left behind: {graded_corpus['leftovers']}"


def test_clean_submissions_have_no_diagnoses(graded_corpus):
    for name in ("good", "blank", "syntax_error"):
        rec = graded_corpus["records"][name]
        assert not [d for d in rec["diagnoses"] if d["kind"] not in ("extra_files",)], (name, rec["diagnoses"])


def test_timeouts_interrupt_only_the_looping_cell(graded_corpus):
    nb = _nb(graded_corpus, "endless_loop")
    loop = next(c for c in nb["cells"] if gc.gid(c) == "ex_01_1_kv_cache")
    assert "CellTimeoutError" in _outputs(loop)
    cells = graded_corpus["records"]["endless_loop"]["cells"]
    assert cells["test_01_4_decode"][0] == cells["test_01_4_decode"][1], "cells after an interrupted loop must still run"
    wedged = _nb(graded_corpus, "wedged_kernel")
    after = [c for c in wedged["cells"] if gc.gid(c) in ("test_01_4_decode", "test_01_quiz")]
    assert len(after) == 2 and all("not graded" in _outputs(c) for c in after), "a kernel that ignores interrupts is stopped"
    assert "CellNotRun" in _outputs(next(c for c in wedged["cells"] if gc.gid(c) == "ex_01_4_decode"))


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
    assert "tests? what tests" not in gc.src(vis) and "Graded by the judge" in _outputs(vis)
    rec = graded_corpus["records"]["edited_locked"]
    assert rec["cells"]["test_01_quiz"][1] == gc.POINTS["quiz"], "edited points must be restored"
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
    assert sorted(ln.split("/")[0] for ln in regraded) == ["good", "regrade_crash"], changed[-3000:]
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
    full_sdpa = sum(r["cells"].get("test_01_1_sdpa", [0, 1])[0] == gc.POINTS["sdpa"] for r in recs)
    assert rows["01_1_sdpa"]["full_marks"] == pytest.approx(full_sdpa / len(recs))
    png = root / "autograded" / "score_distribution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for name, case in graded_corpus["cases"].items():
        if case.review and not case.refused:  # refused folders: under "Refused folders" (their own test)
            assert f"**REVIEW** {name} " in md, f"{name} is not marked for review"
    first = graded_corpus["resume"].stdout
    rate = [ln for ln in first.splitlines() if "submissions/minute" in ln]
    print("\n" + "\n".join(rate))


def _text(html_path) -> str:
    """The feedback page as text: tags (syntax highlighting splits code into spans) removed, entities decoded."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", html_path.read_text()))


def test_feedback_shows_the_judges_report_and_nothing_of_the_judge(graded_corpus):
    root = graded_corpus["root"]
    student = "edited_locked"  # fails sdpa: its report carries the judge's failure messages
    proc = course.run_nbgrader(root, "generate_feedback", gc.SECTION, "--student", student, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = _text(root / "feedback" / student / gc.SECTION / f"{gc.SECTION}.html")
    assert f"Graded by the judge: 0 / {gc.POINTS['sdpa']:g} points" in text and "[FAIL]" in text
    assert gc.JUDGE_SIGNATURE not in text and "MUTANTS" not in text and "BEGIN SOLUTION" not in text
