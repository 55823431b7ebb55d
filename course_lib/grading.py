"""Grading support: nbgrader preprocessors and score reports.

- ``StripSolutionMarkers``: worked solutions without ``### BEGIN/END SOLUTION`` lines.
- ``HideHiddenTests``: feedback for students without hidden test source, and without traceback lines
  that would quote it; the failure message itself (the part written for the learner) stays.
- ``read_scores``: per-cell scores of one graded notebook from the gradebook, with failure messages
  read from the autograded notebook.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nbconvert.preprocessors import Preprocessor

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


class StripSolutionMarkers(Preprocessor):
    """Remove solution delimiter lines (the code between them stays)."""

    enabled = True

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            lines = [ln for ln in cell.source.split("\n") if ln.strip() not in (BEGIN_SOLUTION, END_SOLUTION)]
            cell.source = "\n".join(lines)
        return cell, resources


class HideHiddenTests(Preprocessor):
    """Replace hidden test regions by a note, and tracebacks of graded cells by their last line."""

    enabled = True

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code" or not _nbgrader_meta(cell).get("grade"):
            return cell, resources
        had_hidden = BEGIN_HIDDEN in cell.source
        if had_hidden:
            out, skipping = [], False
            for ln in cell.source.split("\n"):
                if BEGIN_HIDDEN in ln:
                    skipping = True
                    out.append("# (hidden tests ran here during grading; their source is not shown)")
                    continue
                if END_HIDDEN in ln:
                    skipping = False
                    continue
                if not skipping:
                    out.append(ln)
            cell.source = "\n".join(out)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and had_hidden:
                output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources


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


def error_messages(notebook_path: Path) -> dict[str, str]:
    """``{grade_id: "ExcName: message"}`` for every graded cell of an executed notebook that failed."""
    nb = json.loads(Path(notebook_path).read_text())
    out: dict[str, str] = {}
    for cell in nb["cells"]:
        meta = _nbgrader_meta(cell)
        if cell.get("cell_type") != "code" or not meta.get("grade"):
            continue
        msgs = []
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                msgs.append(ANSI.sub("", f"{o.get('ename')}: {o.get('evalue')}"))
            elif o.get("output_type") == "stream" and o.get("name") == "stderr":
                msgs.append("wrote to stderr: " + ANSI.sub("", "".join(o.get("text", "")))[:200])
        if msgs:
            out[meta["grade_id"]] = " | ".join(msgs)
    return out


def read_scores(db_url: str, course_id: str, section: str, student: str, autograded_nb: Path | None = None) -> NotebookScore:
    """Scores of ``student``'s notebook ``section`` from the gradebook (auto scores of graded cells)."""
    from nbgrader.api import Gradebook, MissingEntry

    result = NotebookScore(section, student)
    messages = error_messages(autograded_nb) if autograded_nb and Path(autograded_nb).exists() else {}
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
