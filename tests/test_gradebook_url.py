"""Which gradebook a course uses: SQLite beside its config by default, COURSE_DB_URL's database when set, and always
its own SQLite file in a throw-away course (make check, make verify, the tests' temporary courses)."""

from __future__ import annotations

import shutil

import course
import pytest
from traitlets.config import Config

from course_judge.preprocessors import _course_root

PG = "postgresql+psycopg2://grader@dbhost:5432/gradebook"


@pytest.fixture
def courses():
    made = {"scratch": course.temp_course([]), "shared": course.temp_course([], own_gradebook=False)}
    yield made
    for root in made.values():
        shutil.rmtree(root, ignore_errors=True)


def test_sqlite_by_default_with_a_busy_timeout(courses, monkeypatch):
    monkeypatch.delenv("COURSE_DB_URL", raising=False)
    for root in courses.values():
        assert course._gradebook_url(root) == f"sqlite:///{root / 'gradebook.db'}?timeout=120"


def test_course_db_url_names_the_gradebook_except_in_a_throw_away_course(courses, monkeypatch):
    monkeypatch.setenv("COURSE_DB_URL", f"  {PG}\n")
    assert course._gradebook_url(courses["shared"]) == PG
    scratch = courses["scratch"]
    assert (scratch / course.SQLITE_MARK).is_file()
    assert course._gradebook_url(scratch) == f"sqlite:///{scratch / 'gradebook.db'}?timeout=120"
    monkeypatch.setenv("COURSE_DB_URL", "")
    assert course._gradebook_url(courses["shared"]).startswith("sqlite:///"), "an empty COURSE_DB_URL means the default"


def test_a_batch_switched_to_another_database_grades_everything_again(courses, monkeypatch):
    """The batch skips a submission whose record matches; a record made against another gradebook must not match."""
    monkeypatch.delenv("COURSE_DB_URL", raising=False)
    before = {k: course.grading_fingerprint(r, "01_foundations") for k, r in courses.items()}
    monkeypatch.setenv("COURSE_DB_URL", PG)
    assert course.grading_fingerprint(courses["shared"], "01_foundations") != before["shared"]
    assert course.grading_fingerprint(courses["scratch"], "01_foundations") == before["scratch"]
    pg = course.grading_fingerprint(courses["shared"], "01_foundations")
    monkeypatch.setenv("COURSE_DB_URL", PG.replace("grader@", "grader:secret@"))
    assert course.grading_fingerprint(courses["shared"], "01_foundations") == pg, "a password in the URL changes no grade"


def test_the_judge_finds_the_course_without_a_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_ROOT", raising=False)
    res = {"nbgrader": {"db_url": PG}}
    cfg = Config()
    cfg.CourseDirectory.root = str(tmp_path)
    assert _course_root(res, cfg) == tmp_path
    assert _course_root(res, Config()) is None
    assert _course_root({"nbgrader": {"db_url": f"sqlite:///{tmp_path / 'gradebook.db'}?timeout=120"}}) == tmp_path
