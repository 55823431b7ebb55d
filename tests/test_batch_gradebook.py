"""The batch enters every student in the gradebook before two graders can race to insert the same one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import course
from nbgrader.api import Gradebook


def test_students_exist_before_any_grader_starts(tmp_path, monkeypatch):
    for student in ("ann", "bob"):
        for a in ("01_foundations", "02_mla"):
            (tmp_path / "submitted" / student / a).mkdir(parents=True)
            (tmp_path / "source" / a).mkdir(parents=True, exist_ok=True)
    seen = []
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # nbgrader's alembic

    def fake_grade(root, student, a, force=False):
        # nbgrader's autograde would check-then-insert the student here; it must find it already there
        with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
            seen.append((student, a, gb.find_student(student).id))
        return course.Record(student, a, status="graded")

    monkeypatch.setattr(course, "ensure_assignments", lambda root, names: None)
    monkeypatch.setattr(course, "grade_submission", fake_grade)
    records = course.batch(tmp_path, workers=2, report=False)
    assert sorted((r.student, r.section, r.status) for r in records) == [
        (s, a, "graded") for s in ("ann", "bob") for a in ("01_foundations", "02_mla")]
    assert sorted(seen) == [(s, a, s) for s in ("ann", "bob") for a in ("01_foundations", "02_mla")]
