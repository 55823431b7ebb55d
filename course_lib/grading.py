"""Grading support: nbgrader preprocessors, score reports and the grader's diagnostics.

Preprocessors (wired in ``nbgrader_config.py``):

- ``StripSolutionMarkers``: worked solutions without ``### BEGIN/END SOLUTION`` lines.
- ``RestoreSourceCells`` (autograde, sanitising): the course's cells come back as released: deleted
  locked cells are re-inserted, re-ordered ones return to the release order (the learner's own extra
  cells travel with the cell they followed), metadata of known cells is restored, unknown "graded"
  cells lose their grading metadata, duplicated cells keep one graded copy.
- ``GuardTestCells`` (autograde, sanitising): a guard cell before every graded test
  (see ``course_lib.guard``).
- ``CourseExecute`` (autograde): nbgrader's Execute in a sandboxed kernel (``course_lib.sandbox``), with
  a cap on output per cell, a time limit per notebook, a kernel that stops answering or dies costing only
  the cells not yet run, and the grader's benchmark lock (benchmark cells run alone, never beside any other
  grading cell).
- ``AuditGuards`` (autograde): checks every guard's report, zeroes a test whose guard found tampering it
  could not undo, removes the guard cells.
- ``CourseSaveAutoGrades`` (autograde): nbgrader's scores, except that stderr output alone costs no
  points (errors do) and a numeric result is clamped to the cell's points.
- ``HideHiddenTests`` (feedback): no hidden test source, no traceback quoting it, no output quoting it.

Everything the grader notices is appended, one JSON object a line, to ``$COURSE_DIAG_FILE`` (set per
submission by ``tools/course.py``), which turns it into the batch summary.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nbconvert.preprocessors import Preprocessor

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PACKAGE_DIR = Path(__file__).resolve().parent
BENCH_CALL = re.compile(r"\b_?(compare|time_fn)\s*\(")


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def note(kind: str, detail: str, **extra) -> None:
    """Record one diagnosis for the submission being graded (no-op outside the course's grader)."""
    path = os.environ.get("COURSE_DIAG_FILE")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": kind, "detail": detail, **extra}) + "\n")


def is_test_cell(cell) -> bool:
    m = _nbgrader_meta(cell)
    return cell.get("cell_type") == "code" and bool(m.get("grade")) and not m.get("solution")


def is_bench_cell(cell) -> bool:
    gid = str(_nbgrader_meta(cell).get("grade_id", ""))
    return gid.startswith("bench_") or bool(BENCH_CALL.search(_src(cell)))


def strip_hidden(source: str, placeholder: str | None = None) -> str:
    """`source` without its hidden-test blocks (BEGIN/END HIDDEN TESTS), each replaced by `placeholder` if given."""
    out, skipping = [], False
    for ln in source.split("\n"):
        if BEGIN_HIDDEN in ln:
            skipping = True
            if placeholder is not None:
                out.append(placeholder)
            continue
        if END_HIDDEN in ln:
            skipping = False
            continue
        if not skipping:
            out.append(ln)
    return "\n".join(out)


def _norm(source: str) -> str:
    return "\n".join(ln.rstrip() for ln in source.strip().split("\n") if ln.strip())


def error_output(ename: str, evalue: str):
    import nbformat

    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


# ---------------------------------------------------------------- solutions and feedback


class StripSolutionMarkers(Preprocessor):
    """Remove solution delimiter lines (the code between them stays)."""

    enabled = True

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            lines = [ln for ln in cell.source.split("\n") if ln.strip() not in (BEGIN_SOLUTION, END_SOLUTION)]
            cell.source = "\n".join(lines)
        return cell, resources


class HideHiddenTests(Preprocessor):
    """Feedback without hidden test source: regions replaced by a note, tracebacks of graded cells with
    hidden tests cut to their last line, and any output line that quotes a hidden test line redacted
    (a submission could print the source of the cell being run). Guard cells are dropped.
    """

    enabled = True
    min_quote = 12  # hidden lines shorter than this (``)``, ``else:``) are too common to redact on

    def preprocess(self, nb, resources):
        nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and _src(c).startswith("# [grading guard]"))]
        hidden: set[str] = set()
        visible: set[str] = set()
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            shown = strip_hidden(cell.source)
            visible |= {ln.strip() for ln in shown.split("\n")}
            if BEGIN_HIDDEN in cell.source:
                kept = set(shown.split("\n"))
                hidden |= {ln.strip() for ln in cell.source.split("\n") if ln not in kept and len(ln.strip()) >= self.min_quote}
        hidden -= {BEGIN_HIDDEN, END_HIDDEN} | visible  # a line the learner can see anyway needs no redaction
        self._hidden = hidden
        return super().preprocess(nb, resources)

    def _redact(self, text: str) -> str:
        if not self._hidden or not text:
            return text
        out = []
        for ln in text.split("\n"):
            plain = ANSI.sub("", ln)
            out.append("[line quoting a hidden test removed]" if any(h in plain for h in self._hidden) else ln)
        return "\n".join(out)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, resources
        self._hidden = getattr(self, "_hidden", set())
        had_hidden = BEGIN_HIDDEN in cell.source and bool(_nbgrader_meta(cell).get("grade"))
        if had_hidden:
            cell.source = strip_hidden(cell.source, "# (hidden tests ran here during grading; their source is not shown)")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                if had_hidden:
                    output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
                output["traceback"] = [self._redact(t) for t in output.get("traceback", [])]
                output["evalue"] = self._redact(output.get("evalue", ""))
            elif output.get("output_type") == "stream":
                output["text"] = self._redact(_src({"source": output.get("text", "")}))
            elif "data" in output:
                for mime in list(output["data"]):
                    if mime.startswith("text/") and isinstance(output["data"][mime], (str, list)):
                        output["data"][mime] = self._redact(_src({"source": output["data"][mime]}))
        return cell, resources


# ---------------------------------------------------------------- autograde: sanitising


def _course_root(resources) -> Path | None:
    root = os.environ.get("COURSE_ROOT")
    if root:
        return Path(root)
    db = str(resources.get("nbgrader", {}).get("db_url", ""))
    if db.startswith("sqlite:///"):
        return Path(db[len("sqlite:///"):].split("?")[0]).parent
    return None


class RestoreSourceCells(Preprocessor):
    """Give the notebook back the course's cells, in the release order, before nbgrader's OverwriteCells."""

    enabled = True

    def preprocess(self, nb, resources):
        import nbformat

        info = resources.get("nbgrader", {})
        root = _course_root(resources)
        a, name = info.get("assignment"), info.get("notebook")
        src_path = root / "source" / a / f"{name}.ipynb" if root and a and name else None
        if not src_path or not src_path.exists():
            return nb, resources
        source = nbformat.read(src_path, as_version=4)
        rel_path = root / "release" / a / f"{name}.ipynb"
        release = nbformat.read(rel_path, as_version=4) if rel_path.exists() else None
        released = {_nbgrader_meta(c).get("grade_id"): _src(c) for c in (release.cells if release else [])}
        order = [_nbgrader_meta(c).get("grade_id") for c in source.cells if _nbgrader_meta(c).get("grade_id")]
        src_cells = {_nbgrader_meta(c)["grade_id"]: c for c in source.cells if _nbgrader_meta(c).get("grade_id")}

        # 1. classify the submitted cells; the last copy of a duplicated course cell is the graded one
        last: dict[str, int] = {}
        for i, c in enumerate(nb.cells):
            gid = _nbgrader_meta(c).get("grade_id")
            if gid in src_cells:
                last[gid] = i
        dups, unknown, edited = set(), [], []
        for i, c in enumerate(nb.cells):
            meta = _nbgrader_meta(c)
            gid = meta.get("grade_id")
            if not meta:
                continue
            if gid not in src_cells:
                if meta.get("grade") or meta.get("solution") or meta.get("locked") or gid:
                    unknown.append(str(gid))
                c.metadata.pop("nbgrader", None)
                continue
            if last[gid] != i:
                dups.add(gid)
                c.metadata.pop("nbgrader", None)
                continue
            want = src_cells[gid]
            wm = _nbgrader_meta(want)
            if wm.get("locked") and not wm.get("solution"):
                ref = released.get(gid, strip_hidden(_src(want)))
                if _norm(strip_hidden(_src(c))) != _norm(strip_hidden(ref)) or c.cell_type != want.cell_type:
                    edited.append(gid)
            keep = {k: v for k, v in meta.items() if k == "checksum"}
            c.metadata["nbgrader"] = {**{k: v for k, v in wm.items() if k != "checksum"}, **keep}
        # 2. rebuild in release order; free cells stay behind the course cell they followed
        head, groups, current = [], {}, None
        for c in nb.cells:
            gid = _nbgrader_meta(c).get("grade_id")
            if gid in src_cells:
                current = gid
                groups[gid] = [c]
            elif current is None:
                head.append(c)
            else:
                groups[current].append(c)
        seen = [g for g in (_nbgrader_meta(c).get("grade_id") for c in nb.cells) if g in src_cells]
        present_order = [g for g in order if g in groups]
        restored, lost = [], []
        cells = list(head)
        for gid in order:
            if gid in groups:
                cells += groups[gid]
                continue
            want = src_cells[gid]
            wm = _nbgrader_meta(want)
            if wm.get("solution"):
                lost.append(gid)
                continue
            if wm.get("locked") or wm.get("grade"):
                cell = nbformat.from_dict(json.loads(json.dumps(want)))
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
                cells.append(cell)
                restored.append(gid)
        nb.cells = cells
        if dups:
            note("duplicated", "duplicated course cells (the last copy is graded, earlier copies run as ordinary code): "
                 + ", ".join(sorted(dups)), cells=sorted(dups))
        if unknown:
            note("unknown_cells", "cells claiming grading metadata the course does not know (metadata removed): "
                 + ", ".join(unknown), cells=unknown)
        if edited:
            note("edited_locked", "edited locked cells (restored; graded on the original tests): " + ", ".join(edited),
                 cells=edited)
        if restored:
            note("deleted_restored", "deleted course cells put back: " + ", ".join(restored), cells=restored)
        if lost:
            note("deleted_exercise", "deleted exercise cells (their tests fail): " + ", ".join(lost), cells=lost)
        if seen != present_order:
            note("reordered", "cells were moved; graded in the release order", cells=seen)
        return nb, resources


def _lib_roots() -> list[str]:
    roots: list[str] = []
    lib = Path(os.environ.get("COURSE_LIB_DIR") or PACKAGE_DIR)
    for p in (lib, Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)):
        for q in (str(p), str(p.resolve())):
            q = q.rstrip("/") + "/"
            if q not in roots:
                roots.append(q)
    return roots


def _statements(nb, wanted) -> Iterator[ast.stmt]:
    """Top-level statements of the code cells whose nbgrader metadata satisfies ``wanted`` (unparsable cells skipped)."""
    for c in nb.cells:
        if c.cell_type != "code" or not wanted(_nbgrader_meta(c)):
            continue
        try:
            yield from ast.parse(_src(c)).body
        except SyntaxError:
            continue


def solution_names(nb) -> set[str]:
    """Top-level names the answer (solution) cells define: learners' own, never re-imported by the guard."""
    names: set[str] = set()
    for n in _statements(nb, lambda m: bool(m.get("solution"))):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        for t in n.targets if isinstance(n, ast.Assign) else [getattr(n, "target", None)]:
            if isinstance(t, ast.Name):
                names.add(t.id)
    return names


def locked_imports(nb, exclude: set[str] = frozenset()) -> str:
    """Import statements of the course's locked, non-graded code cells (the setup cell), minus ``exclude``."""
    lines = []
    for n in _statements(nb, lambda m: bool(m.get("locked")) and not m.get("grade") and not m.get("solution")):
        if not (isinstance(n, ast.Import) or (isinstance(n, ast.ImportFrom) and n.module and n.module != "__future__")):
            continue
        plain = isinstance(n, ast.Import)
        keep = [a for a in n.names if a.name != "*"
                and (a.asname or (a.name.split(".")[0] if plain else a.name)) not in exclude]
        if keep:
            n.names = keep
            lines.append(ast.unparse(n))
    return "\n".join(dict.fromkeys(lines))


class GuardTestCells(Preprocessor):
    """Insert a guard cell (``course_lib.guard``) before every graded test cell."""

    enabled = os.environ.get("COURSE_GUARD", "1") != "0"

    def preprocess(self, nb, resources):
        import nbformat

        from course_lib.guard import guard_source

        if not self.enabled:
            return nb, resources
        root = _course_root(resources)
        info = resources.get("nbgrader", {})
        src_path = root / "source" / str(info.get("assignment")) / f"{info.get('notebook')}.ipynb" if root else None
        answers = solution_names(nbformat.read(src_path, as_version=4)) if src_path and src_path.exists() else set()
        imports = locked_imports(nb, answers)
        roots = _lib_roots()
        cells = []
        for c in nb.cells:
            if is_test_cell(c):
                nonce = secrets.token_hex(8)
                g = nbformat.v4.new_code_cell(guard_source(nonce, roots, imports))
                g.metadata["course_guard"] = nonce
                cells.append(g)
            cells.append(c)
        nb.cells = cells
        return nb, resources


# ---------------------------------------------------------------- autograde: execution

try:
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbclient.util import run_sync
    from nbgrader.preprocessors import Execute as _NbgraderExecute
    from nbgrader.preprocessors import SaveAutoGrades as _NbgraderSaveAutoGrades
    from traitlets import Integer
except ImportError:  # pragma: no cover - the grader always has nbgrader
    _NbgraderExecute = _NbgraderSaveAutoGrades = None


if _NbgraderExecute is not None:

    class CourseExecute(_NbgraderExecute):
        """nbgrader's Execute, made safe for untrusted notebooks (see the module docstring)."""

        max_output_bytes = Integer(1_000_000, help="output kept per cell; the rest is dropped").tag(config=True)
        notebook_timeout = Integer(1200, help="seconds for the whole notebook; later cells are not run").tag(config=True)
        responsive_timeout = Integer(15, help="seconds a kernel gets to answer after an interrupted cell").tag(config=True)

        def __init__(self, *args, **kwargs):
            from course_lib.sandbox import SandboxKernelManager

            kwargs["kernel_manager_class"] = SandboxKernelManager
            super().__init__(*args, **kwargs)

        def preprocess(self, nb, resources=None, km=None):
            from course_lib.sandbox import sandbox_status

            self._course_stop: str | None = None
            self._course_t0 = time.monotonic()
            self._course_bytes: dict[tuple[int, str], int] = {}
            self._course_truncated: set[int] = set()
            ok, how = sandbox_status()
            if not ok:
                note("unsandboxed", how)
                self.log.warning("!!! %s", how)
            return super().preprocess(nb, resources, km)

        # -- the grader's benchmark lock: benchmark cells exclusive, every other cell shared
        def _lock(self, cell):
            path = os.environ.get("COURSE_GRADER_LOCK")
            if not path:
                return None
            import fcntl

            fh = open(path, "a")  # noqa: SIM115 - released in _unlock
            fcntl.flock(fh, fcntl.LOCK_EX if is_bench_cell(cell) else fcntl.LOCK_SH)
            return fh

        @staticmethod
        def _unlock(fh) -> None:
            if fh is not None:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()

        async def _responsive(self) -> bool:
            """Does the kernel answer a kernel_info request (is its main thread free)?"""
            try:
                msg_id = self.kc.kernel_info()
                deadline = time.monotonic() + self.responsive_timeout
                while time.monotonic() < deadline:
                    msg = await self.kc.shell_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
                    if msg["parent_header"].get("msg_id") == msg_id:
                        return True
            except Exception:  # noqa: BLE001 - Empty, a dead channel: all mean "not responsive"
                return False
            return False

        async def _stop(self, cell, index: int, ename: str, why: str) -> None:
            self._course_stop = why
            cell.outputs.append(error_output(ename, why))
            gid = _nbgrader_meta(cell).get("grade_id") or f"cell {index}"
            note("kernel_stopped", f"{why} (at {gid}); later cells were not run", cell=gid)
            try:
                await self.km._async_shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - already dead
                pass

        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if cell.cell_type != "code" or not cell.source.strip():
                return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
            if self._course_stop is None and time.monotonic() - self._course_t0 > self.notebook_timeout:
                self._course_stop = f"the notebook ran past its total time limit of {self.notebook_timeout} s"
                note("notebook_timeout", self._course_stop)
            if self._course_stop is not None:
                cell.outputs = [error_output("CellNotRun", f"not run: {self._course_stop}")]
                return cell
            fh = self._lock(cell)
            if is_test_cell(cell) or cell.get("metadata", {}).get("course_guard"):
                store_history = False  # test source never lands in the kernel's input history (_ih, In)
            try:
                cell = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
                if any(o.get("ename") == "CellTimeoutError" for o in cell.outputs):
                    gid = _nbgrader_meta(cell).get("grade_id") or f"cell {cell_index}"
                    note("cell_timeout", f"{gid} ran past its time limit ({self._get_timeout(cell)} s) and was interrupted",
                         cell=gid)
                return cell
            except CellTimeoutError:
                if await self._responsive():
                    cell.outputs.append(error_output("CellTimeoutError", "the cell ran past its time limit"))
                    return cell
                await self._stop(cell, cell_index, "CellTimeoutError",
                                 "the kernel did not stop when this cell ran past its time limit")
                return cell
            except DeadKernelError:
                await self._stop(cell, cell_index, "KernelDied",
                                 "the kernel died (memory or CPU limit, a crash, or exit() in the code)")
                return cell
            finally:
                self._unlock(fh)

        execute_cell = run_sync(async_execute_cell)

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            kind = "text" if msg.get("msg_type") in ("stream", "error") else "rich"  # figures get a larger budget
            size = len(json.dumps(content, default=str)) if msg.get("msg_type") != "clear_output" else 0
            used = self._course_bytes.get((cell_index, kind), 0) + size
            self._course_bytes[(cell_index, kind)] = used
            if used > self.max_output_bytes * (1 if kind == "text" else 20):
                if cell_index not in self._course_truncated:
                    self._course_truncated.add(cell_index)
                    import nbformat

                    outs.append(nbformat.v4.new_output(
                        "stream", name="stdout",
                        text=f"\n[output truncated by the grader after {self.max_output_bytes // 1000} kB]\n"))
                    cell = self.nb.cells[cell_index] if 0 <= cell_index < len(self.nb.cells) else {}
                    where = _nbgrader_meta(cell).get("grade_id") or f"cell {cell_index}"
                    note("output_flood", f"{where} printed more than {self.max_output_bytes // 1000} kB (the rest was dropped)",
                         cell=where)
                return None
            return super().output(outs, msg, display_id, cell_index)

    class AuditGuards(Preprocessor):
        """Check each guard's report, zero the test after a guard that refused, drop the guard cells."""

        enabled = True

        def preprocess(self, nb, resources):
            cells, pending = [], None
            refused: dict[str, list[str]] = {}
            restored: dict[str, list[str]] = {}
            for c in nb.cells:
                nonce = c.get("metadata", {}).get("course_guard")
                if nonce is None:
                    if pending is not None and is_test_cell(c):
                        if not any(o.get("ename") == "CellNotRun" for o in c.get("outputs", [])):
                            c.outputs.append(error_output("GradingIntegrityError", pending))
                        pending = None
                    cells.append(c)
                    continue
                text = "".join(_src({"source": o.get("text", "")}) for o in c.get("outputs", []) if o.get("output_type") == "stream")
                errors = [f"{o.get('ename')}: {ANSI.sub('', str(o.get('evalue')))}" for o in c.get("outputs", [])
                          if o.get("output_type") == "error"]
                nxt = _next_test_id(nb.cells, c)
                if any(e.startswith("CellNotRun") for e in errors):
                    continue
                ok_line = next((ln for ln in text.split("\n") if ln.startswith(f"[grading guard] ok {nonce}")), None)
                if ok_line is None or errors:
                    why = "; ".join(errors) or "the grading guard did not report (its cell was altered or skipped)"
                    pending = ("the grader could not verify that this test ran untampered, so it scores 0: " + why)[:2000]
                    refused.setdefault(why[:1500], []).append(nxt)
                elif "| restored:" in ok_line:
                    restored.setdefault(ok_line.split("| restored:", 1)[1].strip()[:1500], []).append(nxt)
            for why, tests in refused.items():
                note("tamper", f"tests scored 0 ({', '.join(tests)}): {why}", cells=tests)
            for what, tests in restored.items():
                note("restored", f"restored before {tests[0]}: {what}", cells=tests)
            nb.cells = cells
            return nb, resources

    class CourseSaveAutoGrades(_NbgraderSaveAutoGrades):
        """nbgrader's SaveAutoGrades with the course's scoring rule (see ``course_grade``)."""

        def _add_score(self, cell, resources):
            grade = self.gradebook.find_grade(
                cell.metadata["nbgrader"]["grade_id"], self.notebook_id, self.assignment_id, self.student_id)
            grade.auto_score = course_grade(cell)
            grade.needs_manual_grade = grade.manual_score is not None or grade.auto_score is None
            self.gradebook.db.commit()


def course_grade(cell) -> float | None:
    """Points of a graded cell: 0 on any error; a numeric result clamped to [0, points]; else full points.

    Unlike nbgrader, output on stderr alone (a warning, a debug print) costs nothing.
    """
    points = float(_nbgrader_meta(cell).get("points", 0))
    meta = _nbgrader_meta(cell)
    if meta.get("solution") or cell.get("cell_type") != "code":
        from nbgrader.utils import determine_grade

        return determine_grade(cell)[0]
    outputs = cell.get("outputs", [])
    if any(o.get("output_type") == "error" for o in outputs):
        return 0.0
    for o in outputs:
        if o.get("output_type") == "execute_result":
            text = _src({"source": o.get("data", {}).get("text/plain", "")}).strip()
            try:
                return max(0.0, min(points, float(text)))
            except ValueError:
                return points
    return points


def _next_test_id(cells, guard) -> str:
    seen = False
    for c in cells:
        if c is guard:
            seen = True
        elif seen and is_test_cell(c):
            return str(_nbgrader_meta(c).get("grade_id"))
    return "?"


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
    """``test_02_4_mla_hidden`` -> ``02_4_mla``; ``bench_02_absorb`` -> ``bench_02_absorb``."""
    g = re.sub(r"^test_", "", grade_id)
    return re.sub(r"_hidden$", "", g)


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


def stdout_of(notebook_path: Path) -> dict[str, str]:
    """``{grade_id: stdout text}`` of the graded cells of an executed notebook."""
    nb = json.loads(Path(notebook_path).read_text())
    out: dict[str, str] = {}
    for cell in nb["cells"]:
        gid = _nbgrader_meta(cell).get("grade_id")
        if cell.get("cell_type") == "code" and _nbgrader_meta(cell).get("grade") and gid:
            out[gid] = ANSI.sub("", "".join(_src({"source": o.get("text", "")}) for o in cell.get("outputs", [])
                                            if o.get("output_type") == "stream" and o.get("name") == "stdout"))
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
