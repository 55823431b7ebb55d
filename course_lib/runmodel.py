"""How a learner's notebook runs while exercises are unfinished: placeholders instead of tracebacks.

A release notebook has three kinds of code cell: **exercise** cells (nbgrader ``solution``: the stub
``raise NotImplementedError("exercise not implemented yet: ...")`` until the learner answers), **graded**
cells (first line ``# Checks you can run now.``) and the course's **demo** cells (figures, measurements).
A demo cell that needs an unfinished exercise would crash with a ``NotImplementedError`` from the stub or a
``NameError`` of a name the exercise should define. :func:`install` (called by ``course_lib.utils.setup()``,
which every notebook's setup cell runs) registers an IPython exception handler for those two errors: in a
demo cell it prints one line naming the exercise to finish, closes the half-drawn figure, and reports the
cell as finished (so Run All goes on); everywhere else (exercise, graded and the learner's own cells) the
usual traceback is shown (without course_lib.testing's own frames: helpers that set ``__tracebackhide__``).
While grading the same applies: only demo cells' tracebacks go.

A cell's kind comes from the notebook on disk (``JPY_SESSION_NAME``, set by Jupyter for every kernel it
starts, or the only notebook in the kernel's folder): its nbgrader metadata, matched by cell id, else by
source. Without a notebook, the source alone decides (graded marker, stub text); unknown cells keep their
tracebacks.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["install", "uninstall", "show_placeholder", "STUB_MESSAGE", "TEST_MARKER", "Placeholder", "placeholder_text"]

STUB_MESSAGE = "exercise not implemented yet"
TEST_MARKER = "# Checks you can run now."
STUB_MARKER = "YOUR CODE HERE"
PLACEHOLDER_CLASS = "course-placeholder"

_DEF = r"(?m)^\s*(?:async\s+def|def|class)\s+{name}\b|^\s*{name}\s*(?::[^=\n]*)?=(?!=)|^\s*(?:from\s+\S+\s+)?import\s+.*\b{name}\b"


@dataclass
class _Cell:
    kind: str  # "exercise" | "test" | "demo"
    grade_id: str = ""
    heading: str = ""
    source: str = ""


@dataclass
class Placeholder:
    """What a demo cell shows instead of a traceback."""

    needs: str  # the missing function or name
    exercise: str = ""  # grade id of the exercise cell that provides it, when known
    heading: str = ""  # the section heading above that exercise
    reason: str = "stub"  # "stub" (NotImplementedError from the stub) or "undefined" (NameError)


def placeholder_text(p: Placeholder) -> str:
    where = ""
    if p.exercise:
        where = f" (exercise {p.exercise}" + (f", {p.heading}" if p.heading else "") + ")"
    if p.reason == "stub":
        return f"Skipped: this cell needs `{p.needs}`, which is still a stub{where}. Finish it, run its cell, then run this cell again."
    return (f"Skipped: this cell needs `{p.needs}`, which is not defined yet{where}. "
            "Finish that exercise (or run the cell that defines it), then run this cell again.")


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _first_line(src: str) -> str:
    for line in src.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _kind_from_source(src: str) -> str | None:
    if _first_line(src).startswith(TEST_MARKER):
        return "test"
    if STUB_MARKER in src or STUB_MESSAGE in src:
        return "exercise"
    return None


class _Notebook:
    """The notebook the kernel runs, read from disk (re-read when it changes)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._mtime = None
        self.by_id: dict[str, _Cell] = {}
        self.by_source: dict[str, _Cell] = {}
        self.exercises: list[_Cell] = []

    @staticmethod
    def locate() -> Path | None:
        name = os.environ.get("JPY_SESSION_NAME")
        if name:
            for cand in (Path(name), Path.cwd() / Path(name).name):
                if cand.suffix == ".ipynb" and cand.is_file():
                    return cand
        found = sorted(Path.cwd().glob("*.ipynb"))
        return found[0] if len(found) == 1 else None

    def refresh(self) -> None:
        path = self.locate()
        if path is None:
            self.path = None
            return
        try:
            mtime = path.stat().st_mtime_ns
            if path == self.path and mtime == self._mtime:
                return
            nb = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        self.path, self._mtime = path, mtime
        self.by_id, self.by_source, self.exercises = {}, {}, []
        heading = ""
        for cell in nb.get("cells", []):
            src = _source(cell)
            if cell.get("cell_type") == "markdown":
                for line in src.splitlines():
                    if line.startswith("#"):
                        heading = line.lstrip("#").strip()
                continue
            if cell.get("cell_type") != "code":
                continue
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("solution"):
                kind = "exercise"
            elif meta.get("grade"):
                kind = "test"
            else:
                kind = _kind_from_source(src) or "demo"
            c = _Cell(kind, str(meta.get("grade_id", "")), heading, src)
            if cell.get("id"):
                self.by_id[cell["id"]] = c
            self.by_source.setdefault(src.strip(), c)
            if kind == "exercise":
                self.exercises.append(c)

    def classify(self, cell_id: str | None, src: str) -> _Cell | None:
        self.refresh()
        by_src = _kind_from_source(src)
        if by_src == "test":  # the graded marker is authoritative (locked cells are restored before grading)
            return _Cell("test", source=src)
        if cell_id and cell_id in self.by_id:
            return self.by_id[cell_id]
        if src.strip() in self.by_source:
            return self.by_source[src.strip()]
        if by_src:
            return _Cell(by_src, source=src)
        return None  # the learner's own cell, or no notebook known: keep the traceback

    def exercise_defining(self, name: str) -> _Cell | None:
        pat = re.compile(_DEF.format(name=re.escape(name)))
        for c in self.exercises:
            if pat.search(c.source):
                return c
        return None


@dataclass
class _State:
    notebook: _Notebook = field(default_factory=_Notebook)
    current: _Cell | None = None
    unfinished: list[_Cell] = field(default_factory=list)  # exercise cells whose stub raised this session
    placeholder_shown: bool = False


def _cell_files(shell) -> set[str]:
    return set(getattr(getattr(shell, "compile", None), "_filename_map", {}) or {})


def _stub_function(tb, cell_files: set[str]) -> str:
    """The innermost function defined in a notebook cell on the traceback (the stub that raised); "" when the
    error was raised by a cell's top-level code."""
    name = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename in cell_files:
            name = "" if code.co_name == "<module>" else getattr(code, "co_qualname", code.co_name)
        tb = tb.tb_next
    return name


def _prune_hidden(tb):
    """The traceback without frames that set ``__tracebackhide__`` (course_lib.testing's helpers), even the
    innermost one (IPython keeps that), so an assertion's traceback ends at the learner's line."""
    import types

    frames = []
    while tb is not None:
        if not tb.tb_frame.f_locals.get("__tracebackhide__"):
            frames.append(tb)
        tb = tb.tb_next
    new = None
    for t in reversed(frames):
        new = types.TracebackType(new, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return new


def _show_traceback(shell, etype, value, tb) -> None:
    pruned = _prune_hidden(tb)
    if pruned is not None:
        tb = pruned
        value = value.with_traceback(pruned)
    shell.showtraceback((etype, value, tb), running_compiled_code=True)


def _is_stub_error(value: BaseException) -> bool:
    return isinstance(value, NotImplementedError) and STUB_MESSAGE in str(value)


def _placeholder_for(state: _State, value, tb, cell_files: set[str]) -> Placeholder | None:
    nb = state.notebook
    if _is_stub_error(value):
        fn = _stub_function(tb, cell_files)
        if not fn:
            return None
        ex = nb.exercise_defining(fn.split(".")[0])
        return Placeholder(fn, ex.grade_id if ex else "", ex.heading if ex else "", "stub")
    if isinstance(value, NameError) and not isinstance(value, UnboundLocalError):
        name = getattr(value, "name", None)
        if not name:
            m = re.search(r"name '([^']+)' is not defined", str(value))
            name = m.group(1) if m else None
        if not name:
            return None
        ex = nb.exercise_defining(name)
        if ex is None and state.unfinished:
            ex = state.unfinished[0]
        return Placeholder(name, ex.grade_id if ex else "", ex.heading if ex else "", "undefined")
    return None


def _show(p: Placeholder) -> None:
    from IPython.display import display

    text = placeholder_text(p)
    body = html.escape(text)
    body = re.sub(r"`([^`]+)`", r"<code>\1</code>", body)
    display({"text/plain": text,
             "text/html": f'<div class="{PLACEHOLDER_CLASS}" role="status" '
                          f'style="padding:4px 8px;border-left:4px solid #d9a400;background:#fff8e1">{body}</div>'},
            raw=True)


def _close_figures() -> None:
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close("all")


def _shell():
    """The running IPython shell, or None (plain Python, or IPython not installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def show_placeholder(exc: BaseException) -> bool:
    """Show the placeholder for ``exc`` raised by an unfinished exercise outside a cell's own code (a widget
    callback, say); False when ``exc`` is not such an error (the caller re-raises)."""
    ip = _shell()
    if ip is None:
        return False
    reg = getattr(ip, "_course_run_model", None)
    state = reg[0] if reg else _State()
    state.notebook.refresh()
    p = _placeholder_for(state, exc, exc.__traceback__, _cell_files(ip))
    if p is None:
        return False
    _show(p)
    return True


def install(ip=None) -> bool:
    """Register the run model in the running IPython shell (idempotent); False when there is none."""
    ip = ip if ip is not None else _shell()
    if ip is None:
        return False
    if getattr(ip, "_course_run_model", None) is not None:
        return True
    state = _State()

    def pre_run_cell(info) -> None:
        state.placeholder_shown = False
        try:
            state.current = state.notebook.classify(getattr(info, "cell_id", None), getattr(info, "raw_cell", "") or "")
        except Exception:  # never let the run model break a cell
            state.current = None

    def post_run_cell(result) -> None:
        if state.placeholder_shown and result is not None:
            result.error_in_exec = None  # the cell "ran": Run All goes on, the cell shows no error
        state.placeholder_shown = False

    def handler(shell, etype, value, tb, tb_offset=None):
        cell, files = state.current, _cell_files(shell)
        if cell is not None and cell.kind == "exercise" and _is_stub_error(value) and _stub_function(tb, files) == "":
            if cell not in state.unfinished:
                state.unfinished.append(cell)
        p = _placeholder_for(state, value, tb, files) if cell is not None and cell.kind == "demo" else None
        if p is None:
            _show_traceback(shell, etype, value, tb)
            return None
        _close_figures()
        _show(p)
        state.placeholder_shown = True
        return None

    ip.events.register("pre_run_cell", pre_run_cell)
    ip.events.register("post_run_cell", post_run_cell)
    ip.set_custom_exc((NotImplementedError, NameError, AssertionError), handler)
    ip._course_run_model = (state, pre_run_cell, post_run_cell)
    return True


def uninstall(ip=None) -> None:
    if ip is None:
        from IPython import get_ipython

        ip = get_ipython()
    reg = getattr(ip, "_course_run_model", None) if ip is not None else None
    if reg is None:
        return
    _, pre, post = reg
    ip.events.unregister("pre_run_cell", pre)
    ip.events.unregister("post_run_cell", post)
    ip.set_custom_exc((), None)
    ip._course_run_model = None
