"""The batch's bookkeeping without grading anything: students entered before the graders race, folders refused,
staging caps, links and timestamps, failures that must replace an old grade, reports that are always written."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import course
import pytest
from nbgrader.api import Gradebook

from course_judge import dask_batch


def test_students_exist_before_any_grader_starts(tmp_path, monkeypatch):
    for student in ("ann", "bob"):
        for a in ("01_foundations", "02_mla"):
            (tmp_path / "submitted" / student / a).mkdir(parents=True)
            (tmp_path / "source" / a).mkdir(parents=True, exist_ok=True)
    seen = []
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # nbgrader's alembic

    def fake_pool(root, todo, force, workers, done):
        # nbgrader's autograde would check-then-insert the student here; it must find it already there
        for student, a in todo:
            with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
                seen.append((student, a, gb.find_student(student).id))
            done(student, a, {"student": student, "section": a, "status": "graded"}, None)
        return workers, "test pool"

    monkeypatch.setattr(course, "ensure_assignments", lambda root, names: None)
    monkeypatch.setattr(dask_batch, "grade_all", fake_pool)
    records = course.batch(tmp_path, workers=2, report=False)
    assert sorted((r.student, r.section, r.status) for r in records) == [
        (s, a, "graded") for s in ("ann", "bob") for a in ("01_foundations", "02_mla")]
    assert sorted(seen) == [(s, a, s) for s in ("ann", "bob") for a in ("01_foundations", "02_mla")]


# ---------------------------------------------------------------- folders the batch refuses, staging, failures


def _nb(cells: int = 2) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": "x = 1", "outputs": [],
                       "execution_count": None} for i in range(cells)]}


def _submit(root: Path, student: str, a: str = "01_foundations", nb: dict | None = None) -> Path:
    folder = root / "submitted" / student / a
    folder.mkdir(parents=True)
    (folder / f"{a}.ipynb").write_text(json.dumps(nb or _nb()))
    return folder


def test_reserved_unusable_and_linked_folders_are_refused(tmp_path):
    (tmp_path / "source" / "01_foundations").mkdir(parents=True)
    names = ["alice", "summary.md", "Summary.MD", "README.md", ".batch", "bad id", "o'brien", "jos\u00e9", "$(rm -rf x)",
             "eve\n", "-dash"]
    for n in names:
        _submit(tmp_path, n)
    (tmp_path / "submitted" / "linked").symlink_to(tmp_path / "source", target_is_directory=True)
    (tmp_path / "submitted" / "stray.zip").write_text("")
    (tmp_path / "submitted" / ".DS_Store").write_text("")
    found, refused = course._scan_submitted(tmp_path)
    assert found == [("alice", "01_foundations")]
    kinds = {r.student: r.diagnoses[0]["kind"] for r in refused}
    assert set(kinds) == set(names[1:]) | {"linked", "stray.zip"}
    assert kinds["linked"] == "symlink" and all(k == "invalid_student" for n, k in kinds.items() if n != "linked")
    assert course.submissions(tmp_path) == found
    assert course.student_id_problem("alice") is None and course.student_id_problem("bob\n") is not None


def test_stage_caps_links_and_timestamps(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("COURSE_MAX_NOTEBOOK_MB", "1")
    monkeypatch.setenv("COURSE_MAX_CELLS", "100")
    monkeypatch.setenv("COURSE_MAX_JSON_DEPTH", "20")
    a = "01_foundations"
    cases = {
        "big": ("notebook_limit", {"cells": [], "x": "y" * (2 << 20)}),
        "cells": ("notebook_limit", _nb(150)),
        "deep": ("notebook_limit", None),
        "deeper": ("notebook_limit", {"cells": [], "metadata": {"a": json.loads("[" * 25 + "]" * 25)}}),
    }
    for student, (_, nb) in cases.items():
        folder = _submit(tmp_path, student, a, nb or {})
        if nb is None:
            (folder / f"{a}.ipynb").write_text('{"cells": [' + "[" * 200_000 + "]" * 200_000 + "]}")
    for student, (kind, _) in cases.items():
        t0 = time.perf_counter()
        staged, diags = course.stage(tmp_path, student, a)
        assert staged is None and kind in {d["kind"] for d in diags}, (student, diags)
        assert time.perf_counter() - t0 < 5
    folder = _submit(tmp_path, "links", a)
    (folder / "timestamp.txt").symlink_to("/etc/shadow")
    (folder / "etc").symlink_to("/etc", target_is_directory=True)
    (folder / "data.csv").write_text("1,2\n")
    staged, diags = course.stage(tmp_path, "links", a)
    assert staged is not None and "symlink" in {d["kind"] for d in diags}
    assert sorted(p.name for p in staged.iterdir()) == [f"{a}.ipynb", "data.csv"]
    for text, ok in (("2024-03-01 12:00:00 UTC", True), ("last tuesday", False), ("", False), ("9999999-99-99", False)):
        folder = tmp_path / "submitted" / "ts" / a
        shutil.rmtree(folder.parent, ignore_errors=True)
        _submit(tmp_path, "ts", a)
        (folder / "timestamp.txt").write_text(text)
        staged, diags = course.stage(tmp_path, "ts", a)
        assert staged is not None and (staged / "timestamp.txt").exists() == ok, (text, diags)
        assert ("bad_timestamp" in {d["kind"] for d in diags}) != ok
    linked = tmp_path / "submitted" / "sec" / a
    linked.parent.mkdir(parents=True)
    linked.symlink_to(tmp_path / "submitted" / "ts" / a, target_is_directory=True)
    staged, diags = course.stage(tmp_path, "sec", a)
    assert staged is None and diags[0]["kind"] == "symlink"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A temporary course with Section 1 generated (gradebook included)."""
    root = course.temp_course(["01_foundations"])
    proc = course.run_nbgrader(root, "generate_assignment", "01_foundations", "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _full_marks(root: Path, student: str, a: str) -> None:
    with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
        gb.update_or_create_student(student)
        sub = gb.update_or_create_submission(a, student)
        for nb in sub.notebooks:
            for g in nb.grades:
                g.auto_score = g.max_score
        gb.db.commit()


def _score(root: Path, student: str, a: str) -> float:
    with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
        return gb.find_submission(a, student).score


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded"), MemoryError(), OSError(5, "I/O error")])
def test_any_failure_while_staging_replaces_the_old_grade(released, monkeypatch, error):
    a, student = "01_foundations", f"crash{type(error).__name__.lower()}"
    _submit(released, student, a)
    _full_marks(released, student, a)
    (released / "autograded" / student / a).mkdir(parents=True)
    (released / "autograded" / student / a / f"{a}.ipynb").write_text("{}")  # the old graded notebook
    assert _score(released, student, a) > 0

    def crash(root, s, a):
        raise error

    monkeypatch.setattr(course, "stage", crash)
    rec = course.grade_submission(released, student, a, force=True)
    assert rec.status == "failed" and rec.score == 0 and {d["kind"] for d in rec.diagnoses} == {"grading_failed"}
    assert type(error).__name__ in rec.diagnoses[0]["detail"]
    assert _score(released, student, a) == 0, "the old full grade must not stand"
    assert not (released / "autograded" / student / a).exists()
    saved = course.load_record(released, student, a)
    assert saved is not None and saved.status == "failed"


def test_summary_is_written_even_where_a_folder_is_in_its_way(tmp_path):
    out = tmp_path / "autograded"
    (out / "summary.md" / "01_foundations").mkdir(parents=True)  # what a student folder named summary.md left
    (out / "summary.json").mkdir()
    rec = course.Record("ann", "01_foundations", status="graded", score=1, max_score=2)
    refused = [course.Record("summary.md", "*", status="refused", diagnoses=[course._diag("invalid_student", "reserved")])]
    md = course.write_summary(tmp_path, [rec], 1.0, 1, "test", refused=refused)
    assert md.is_file() and (out / "summary.json").is_file() and "Refused folders" in md.read_text()
    assert json.loads((out / "summary.json").read_text())["refused"][0]["student"] == "summary.md"
    moved = list((tmp_path / course.BATCH / "quarantine").iterdir())
    assert len(moved) == 2
