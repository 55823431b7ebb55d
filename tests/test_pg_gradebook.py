"""The gradebook in PostgreSQL (COURSE_DB_URL) grades exactly as in SQLite, against a real server this test starts.

One small batch of Section 1 (reference, partial and a broken notebook), graded by the batch with 2 workers twice:
into SQLite, and into a PostgreSQL database set up the way docs/GRADING.md tells (a login role owning an empty
database, the password in a pgpass file, the schema made by `tools/course.py db-upgrade`: nbgrader's first connection,
then its alembic migrations). Every score
(per submission, per graded cell), grades.csv, what the Formgrader's API shows and the feedback pages must be the same;
then a submission regraded into a notebook that once crashed staging and a grader killed mid-run both leave 0 and a
diagnosis in PostgreSQL as in SQLite (never the earlier grade).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

import course
import grading_corpus as gc
import pg_server
import pytest

pytestmark = [pytest.mark.pipeline, pytest.mark.xdist_group("pg_gradebook")]
A = gc.SECTION
PORTS = range(15440, 15450)
STUDENTS = ("broken", "partial", "reference")
GRADED = ("partial", "reference")  # the two that run (concurrently); broken scores 0 without running


def _snapshot(root: Path) -> dict:
    """Every submission's score and every graded cell's scores, as the gradebook holds them."""
    from nbgrader.api import Gradebook

    out: dict = {}
    with Gradebook(course._gradebook_url(root), course.COURSE_ID) as gb:
        out["students"] = sorted(s.id for s in gb.students)
        for a in gb.assignments:
            for sub in gb.assignment_submissions(a.name):
                cells = {g.name: (g.auto_score, g.manual_score, g.max_score) for nb in sub.notebooks for g in nb.grades}
                out[(sub.student_id, a.name)] = {"score": sub.score, "max": sub.max_score, "cells": cells}
    return out


def _records(records: list[course.Record]) -> dict:
    return {r.student: {"status": r.status, "score": r.score, "max": r.max_score,
                        "cells": {g: c[:2] for g, c in r.cells.items()},
                        "kinds": sorted({d["kind"] for d in r.diagnoses})} for r in records}


def _grades_csv(root: Path) -> list[dict]:
    with open(root / "grades.csv", newline="") as f:
        return sorted(csv.DictReader(f), key=lambda row: (row["assignment"], row["student_id"]))


def _formgrader_view(root: Path) -> dict:
    """What the Formgrader lists for the section: it reads the gradebook through NbGraderAPI and the course's config."""
    from nbgrader.apps.api import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    api = NbGraderAPI(CourseDirectory(config=cfg), config=cfg)
    return {s["student"]: (s["score"], s["max_score"], s["autograded"]) for s in api.get_submissions(A)}


def _overlapping(records: list[course.Record]) -> bool:
    """Whether two of these gradings ran at the same time for more than 2 s (the graders really wrote concurrently)."""
    spans = []
    for r in records:
        if r.status == "graded":
            end = dt.datetime.strptime(r.graded_at, "%Y-%m-%d %H:%M:%S").timestamp()
            spans.append((end - r.seconds, end))
    return any(min(e1, e2) - max(s1, s2) > 2 for i, (s1, e1) in enumerate(spans) for s2, e2 in spans[i + 1:])


def _grade_both(roots: dict[str, Path], **kw) -> dict[str, dict]:
    out = {}
    for kind, root in roots.items():
        recs = course.batch(root, workers=2, **kw)
        out[kind] = {"records": recs, "view": _records(recs), "db": _snapshot(root), "csv": _grades_csv(root)}
    return out


@pytest.fixture(scope="module")
def graded():
    bindir = pg_server.bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb, postgres and pg_ctl in /usr/lib/postgresql/*/bin or on PATH): "
                    "`make install` as root installs Debian's postgresql, or run `apt-get install postgresql`")
    server = pg_server.PgServer(PORTS, bindir=bindir)
    sql_root = course.temp_course([A])  # its own SQLite gradebook (the .sqlite-gradebook mark)
    pg_root = Path(tempfile.mkdtemp(prefix="course-"))
    pgpass = Path(tempfile.mkdtemp(prefix="pgpass-")) / "pgpass"
    out: dict = {"server": server}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # nbgrader's alembic
        mp.setenv("MPLBACKEND", "Agg")
        try:
            course.release(sql_root, [A])
            course.samples(sql_root, [A])
            shutil.rmtree(sql_root / "submitted" / "blank")  # the batch stays small: partial and reference run
            rel = course._load(sql_root / "release" / A / f"{A}.ipynb")
            gc.broken_json(sql_root / "submitted" / "broken" / A, rel, rel)
            shutil.copytree(sql_root, pg_root, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("gradebook.db", course.SQLITE_MARK))
            server.start()
            password = "grader-" + server.password[:10]
            server.create_database("gradebook", "grader", password)
            pgpass.write_text(server.pgpass_line("gradebook", "grader", password))
            pgpass.chmod(0o600)
            mp.setenv("PGPASSFILE", str(pgpass))
            mp.setenv("COURSE_DB_URL", server.url("gradebook", "grader"))
            out["urls"] = {"sqlite": course._gradebook_url(sql_root), "pg": course._gradebook_url(pg_root)}
            out["tables_before"] = _tables(server)
            course.upgrade_gradebook(pg_root)  # the empty database: schema created, then nbgrader's migrations
            out["tables_after"] = _tables(server)
            out["alembic"] = _alembic_version(server)
            course.upgrade_gradebook(pg_root)  # again: a database at the current schema is left as it is
            out["alembic_again"] = _alembic_version(server)
            roots = {"sqlite": sql_root, "pg": pg_root}
            out["first"] = _grade_both(roots)
            out["formgrader"] = {k: _formgrader_view(r) for k, r in roots.items()}
            out["feedback"] = {k: {s: _feedback(r, s) for s in GRADED} for k, r in roots.items()}
            # failures: reference regraded into a notebook that once crashed staging (the corpus's regrade_crash),
            # partial's grader killed after 1 s (a real crash of the nbgrader process)
            for r in roots.values():
                gc.regrade_to_crash(r / "submitted" / "reference" / A)
            mp.setenv("COURSE_SUBMISSION_TIMEOUT", "1")
            out["crash"] = _grade_both(roots, students=["reference", "partial"], force=True)
            out["sqlite_file_in_pg_course"] = (pg_root / "gradebook.db").exists()
            yield out
        finally:
            server.stop()
            shutil.rmtree(sql_root, ignore_errors=True)
            shutil.rmtree(pg_root, ignore_errors=True)
            shutil.rmtree(pgpass.parent, ignore_errors=True)


def _feedback(root: Path, student: str) -> str | None:
    proc = course.run_nbgrader(root, "generate_feedback", A, "--student", student, "--force")
    page = root / "feedback" / student / A / f"{A}.html"
    return page.read_text() if proc.returncode == 0 and page.exists() else None


def _tables(server: pg_server.PgServer) -> list[str]:
    import psycopg2

    con = psycopg2.connect(server.dsn("gradebook", server.superuser, server.password))
    try:
        with con.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
            return [r[0] for r in cur.fetchall()]
    finally:
        con.close()


def _alembic_version(server: pg_server.PgServer) -> list[str]:
    import psycopg2

    con = psycopg2.connect(server.dsn("gradebook", server.superuser, server.password))
    try:
        with con.cursor() as cur:
            cur.execute("SELECT version_num FROM alembic_version")
            return [r[0] for r in cur.fetchall()]
    finally:
        con.close()


def test_the_course_reads_and_writes_the_database_course_db_url_names(graded):
    assert graded["urls"]["pg"].startswith("postgresql+psycopg2://grader@") and graded["urls"]["pg"].endswith("/gradebook")
    assert graded["urls"]["sqlite"].startswith("sqlite:///"), "a throw-away course must keep its own SQLite gradebook"
    assert not graded["sqlite_file_in_pg_course"], "something wrote a SQLite gradebook beside the PostgreSQL one"


def test_db_upgrade_creates_the_schema_and_nbgrader_migrates_it(graded):
    from alembic.script import ScriptDirectory
    from nbgrader.dbutil import ALEMBIC_DIR

    head = ScriptDirectory(ALEMBIC_DIR).get_current_head()  # the newest of nbgrader's migrations
    assert graded["tables_before"] == []
    assert {"alembic_version", "assignment", "student", "submitted_assignment", "grade", "comment"} <= set(graded["tables_after"])
    assert graded["alembic"] == [head] == graded["alembic_again"]


def test_every_score_in_postgresql_equals_sqlite(graded):
    sql, pg = graded["first"]["sqlite"], graded["first"]["pg"]
    scores = {s: sql["db"][(s, A)]["score"] for s in STUDENTS}
    # the batch is worth comparing: full marks, something in between, a notebook that never ran
    assert scores["reference"] == gc.FULL and 0 < scores["partial"] < gc.FULL
    assert scores["broken"] == 0 and "broken_notebook" in sql["view"]["broken"]["kinds"]
    assert len(sql["db"][("reference", A)]["cells"]) == len(gc.POINTS)
    assert pg["db"] == sql["db"]
    assert pg["view"] == sql["view"]
    assert _overlapping(pg["records"]), "the two graders never wrote to PostgreSQL at the same time"


def test_grades_csv_formgrader_and_feedback_equal(graded):
    first = graded["first"]
    assert len(first["sqlite"]["csv"]) == len(STUDENTS)
    assert first["pg"]["csv"] == first["sqlite"]["csv"]
    fg = graded["formgrader"]
    assert fg["pg"] == fg["sqlite"] and fg["pg"]["reference"][:2] == (gc.FULL, gc.FULL)
    fb = graded["feedback"]
    for s in GRADED:
        score = first["sqlite"]["db"][(s, A)]["score"]
        heading = f"{A} (Score: {round(float(score), 2)} / {round(gc.FULL, 2)})"  # the feedback template's heading
        for kind in ("pg", "sqlite"):
            assert fb[kind][s] is not None, f"no {kind} feedback page for {s}"
            assert heading in fb[kind][s], f"the {kind} feedback page of {s} does not show {heading!r}"


def test_crashed_gradings_leave_zero_and_a_diagnosis_in_postgresql_as_in_sqlite(graded):
    sql, pg = graded["crash"]["sqlite"], graded["crash"]["pg"]
    ref, part = pg["view"]["reference"], pg["view"]["partial"]
    assert ref["status"] == "zero" and ref["score"] == 0 and "notebook_limit" in ref["kinds"]
    assert part["status"] == "failed" and part["score"] == 0 and "grading_failed" in part["kinds"]
    for s in ("reference", "partial"):
        db = pg["db"][(s, A)]
        assert db["score"] == 0 and all(c[0] == 0 for c in db["cells"].values()), f"an earlier grade of {s} still stands"
    assert pg["db"] == sql["db"] and pg["view"] == sql["view"] and pg["csv"] == sql["csv"]
