"""Scores and verdicts of graded submissions, and the process that runs one nbgrader command.

The gradebook holds each graded cell's points (written from the judge's verdicts by
``course_judge.preprocessors.CourseSaveAutoGrades``); the per-part results and messages of each
verdict travel in the submission's diagnosis file (``kind: "verdict"``), which ``tools/course.py``
keeps in its batch records and prints in ``make check``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from course_judge.verdict import Verdict


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def verdicts_from_diagnoses(diagnoses: list[dict]) -> dict[str, Verdict]:
    """``{grade_id: Verdict}`` from a submission's diagnosis lines (the last verdict of a cell wins)."""
    out = {}
    for d in diagnoses:
        if d.get("kind") == "verdict" and isinstance(d.get("verdict"), dict):
            try:
                v = Verdict.from_json(d["verdict"])
            except (TypeError, KeyError, ValueError):
                continue
            out[v.grade_id] = v
    return out


# ---------------------------------------------------------------- score reports


@dataclass
class CellScore:
    grade_id: str
    score: float
    max_score: float
    message: str = ""


@dataclass
class NotebookScore:
    section: str
    student: str
    cells: list[CellScore] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(c.score for c in self.cells)

    @property
    def max_score(self) -> float:
        return sum(c.max_score for c in self.cells)


def exercise_of(grade_id: str) -> str:
    """``test_02_4_mla`` -> ``02_4_mla``; ``bench_02_absorb`` -> ``bench_02_absorb``."""
    return re.sub(r"^test_", "", grade_id)


def read_scores(db_url: str, course_id: str, section: str, student: str, autograded_nb: Path | None = None,
                messages: dict[str, str] | None = None) -> NotebookScore:
    """Scores of ``student``'s notebook ``section`` from the gradebook (auto scores of graded cells)."""
    from nbgrader.api import Gradebook, MissingEntry

    result = NotebookScore(section, student)
    messages = messages or {}
    with Gradebook(db_url, course_id) as gb:
        try:
            nb = gb.find_submission_notebook(section, section, student)
        except MissingEntry:
            result.problems.append("no graded submission in the gradebook")
            return result
        for g in sorted(nb.grades, key=lambda g: g.cell_id or g.name):
            score = g.score if g.score is not None else 0.0
            result.cells.append(CellScore(g.name, float(score), float(g.max_score), messages.get(g.name, "")))
    order = _cell_order(autograded_nb) if autograded_nb and Path(autograded_nb).exists() else {}
    result.cells.sort(key=lambda c: order.get(c.grade_id, 10**6))
    return result


def _cell_order(notebook_path: Path) -> dict[str, int]:
    nb = json.loads(Path(notebook_path).read_text())
    return {_nbgrader_meta(c).get("grade_id"): i for i, c in enumerate(nb["cells"]) if _nbgrader_meta(c).get("grade_id")}


# ---------------------------------------------------------------- one grading process


def nbgrader_cli(argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """Run ``nbgrader *argv`` in this (fresh, forked) process with ``env`` and ``cwd``, output to ``log``; exits.

    ``tools/course.py`` starts one such process per submission from a fork server that has nbgrader
    imported already; the process dies with its parent (a crashed batch leaves nothing running).
    """
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        from nbgrader.apps.nbgraderapp import NbGraderApp

        sys.argv = ["nbgrader", *argv]
        NbGraderApp.launch_instance(argv=argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit status
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
