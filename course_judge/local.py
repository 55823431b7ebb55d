"""Judging without nbgrader or a kernel: a section's given and answer cells run in this process.

The mutant suite (``tests/test_judges.py``) and authors use this to grade a solution, a planted wrong
answer or an alternative correct one in seconds. The judge talks to the namespace through
:class:`course_judge.session.LocalChannel`, the same wire format as a real kernel, so a value that
could not cross from a kernel cannot cross here either.

Only the notebook's given (locked) and answer cells before the exercise's placeholder run: demo,
figure and check cells are skipped.
"""

from __future__ import annotations

import contextlib
import json
import linecache
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from course_judge import static, verdict
from course_judge.session import LocalChannel, Session

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """A named wrong answer: ``old`` replaced by ``new`` in an answer cell; the judge must fail it."""

    name: str
    old: str
    new: str
    expect: str  # text (case-insensitive) the failure messages must contain: the diagnosis of this mistake
    cell: str | None = None  # answer cell grade id (default: the judge module's first answer cell)
    count: int = 1  # how often ``old`` occurs in the cell (0: any number, all replaced)


@dataclass(frozen=True)
class Alternative:
    """A different correct answer (einsum for matmul, a loop, float64 intermediates): full marks expected."""

    name: str
    old: str = ""
    new: str = ""
    source: str | None = None  # the whole cell instead of a replacement
    cell: str | None = None
    count: int = 1


def notebook(section: str, root: Path = ROOT) -> dict:
    return json.loads((root / "source" / section / f"{section}.ipynb").read_text())


def patch(source: str, change: Mutant | Alternative) -> str:
    if getattr(change, "source", None) is not None:
        return change.source
    n = source.count(change.old)
    if (change.count and n != change.count) or n == 0:
        raise ValueError(f"{change.name!r}: {change.old!r} occurs {n} times in the cell (expected {change.count or 'some'})")
    return source.replace(change.old, change.new)


def _answer_cell(module: ModuleType, change: Mutant | Alternative) -> str:
    return change.cell or module.ANSWERS[0]


def patched_notebook(nb: dict, module: ModuleType, changes: list[Mutant | Alternative]) -> dict:
    nb = json.loads(json.dumps(nb))
    for ch in changes:
        gid = _answer_cell(module, ch)
        cells = [c for c in nb["cells"] if static._meta(c).get("grade_id") == gid]
        if not cells:
            raise LookupError(f"{module.__name__}: no answer cell {gid}")
        cells[0]["source"] = patch(static.cell_source(cells[0]), ch)
    return nb


@contextlib.contextmanager
def _grading_env():
    old = os.environ.get("NBGRADER_EXECUTION")
    os.environ["NBGRADER_EXECUTION"] = "autograde"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NBGRADER_EXECUTION", None)
        else:
            os.environ["NBGRADER_EXECUTION"] = old


def namespace(nb: dict, upto: str) -> dict:
    """Run the given and answer cells that precede the placeholder cell ``upto`` in a fresh namespace."""
    ns: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    with _grading_env():
        for i, c in enumerate(nb["cells"]):
            m = static._meta(c)
            if m.get("grade_id") == upto:
                return ns
            if c.get("cell_type") != "code" or not (m.get("solution") or (m.get("locked") and not m.get("grade"))):
                continue
            if str(m.get("grade_id", "")).startswith("check_"):
                continue
            src = "\n".join(ln for ln in static.cell_source(c).split("\n") if not ln.lstrip().startswith(("%", "!")))
            name = f"<cell {m.get('grade_id') or i}>"
            linecache.cache[name] = (len(src), None, src.splitlines(keepends=True), name)  # inspect.getsource works, as in IPython
            try:
                exec(compile(src, name, "exec"), ns)  # noqa: S102 - the course's own cells
            except Exception as e:  # noqa: BLE001 - a broken answer leaves its names undefined, as in a kernel
                ns.setdefault("__cell_errors__", []).append(f"{m.get('grade_id')}: {type(e).__name__}: {e}")
    raise LookupError(f"no placeholder cell {upto} in the notebook")


def grade(section: str, module: ModuleType, changes: list[Mutant | Alternative] = (), nb: dict | None = None) -> verdict.Verdict:
    """Grade one exercise of ``section``'s solution notebook, with ``changes`` applied to its answer cells."""
    nb = patched_notebook(nb or notebook(section), module, list(changes))
    rejected = static.rejection(nb, module)
    session = Session(LocalChannel({} if rejected else namespace(nb, module.GRADE_ID)))
    return verdict.run(module, session, rejected=rejected, source=static.answer_cells(nb, module.ANSWERS))
