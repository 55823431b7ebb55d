"""nbgrader preprocessors of the course's grader (wired in ``nbgrader_config.py``).

- ``StripSolutionMarkers``: worked solutions without ``### BEGIN/END SOLUTION`` lines.
- ``RestoreSourceCells`` (autograde, sanitising): the course's cells come back as released: deleted
  locked cells are re-inserted, re-ordered ones return to the release order (the learner's own extra
  cells travel with the cell they followed), metadata of known cells is restored, unknown "graded"
  cells lose their grading metadata, duplicated cells keep one graded copy.
- ``CourseExecute`` (autograde): nbgrader's Execute in a sandboxed kernel (:mod:`course_judge.sandbox`).
  The learner's and the course's ordinary cells run in the kernel as written; a **graded** cell never
  does. At each graded cell the judge module of that exercise (:mod:`course_judge`) runs here, in the
  grader, and drives the learner's objects through :mod:`course_judge.kernel`; its verdict and report
  replace the cell's output. Also: a cap on output per cell, a time limit per notebook, a kernel that
  stops answering or dies costing only what was not graded yet, the grader's benchmark lock
  (benchmark exercises are judged alone, never beside any other grading cell).
- ``CourseSaveAutoGrades`` (autograde): the gradebook's scores are the judge's verdicts, never the
  kernel's output (an inconclusive benchmark is left ungraded and flagged for a regrade).

Everything the grader notices is appended, one JSON object a line, to ``$COURSE_DIAG_FILE`` (set per
submission by ``tools/course.py``), which turns it into the batch summary; verdicts travel the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

from nbconvert.preprocessors import Preprocessor

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    return str(_nbgrader_meta(cell).get("grade_id", "")).startswith("bench_")


def error_output(ename: str, evalue: str):
    import nbformat

    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _norm(source: str) -> str:
    return "\n".join(ln.rstrip() for ln in source.strip().split("\n") if ln.strip())


# ---------------------------------------------------------------- solutions


class StripSolutionMarkers(Preprocessor):
    """Remove solution delimiter lines (the code between them stays)."""

    enabled = True

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            lines = [ln for ln in cell.source.split("\n") if ln.strip() not in (BEGIN_SOLUTION, END_SOLUTION)]
            cell.source = "\n".join(lines)
        return cell, resources


# ---------------------------------------------------------------- autograde: sanitising


def _course_root(resources, config=None) -> Path | None:
    """The course directory: COURSE_ROOT (the batch sets it), else nbgrader's CourseDirectory.root from the config, else
    the folder of a SQLite gradebook (a PostgreSQL gradebook says nothing about where the course is)."""
    root = os.environ.get("COURSE_ROOT") or (config or {}).get("CourseDirectory", {}).get("root")
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
        root = _course_root(resources, self.config)
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
                ref = released.get(gid, _src(want))
                if _norm(_src(c)) != _norm(ref) or c.cell_type != want.cell_type:
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


# ---------------------------------------------------------------- autograde: execution and judging

try:
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from nbclient.util import run_sync
    from nbgrader.preprocessors import Execute as _NbgraderExecute
    from nbgrader.preprocessors import SaveAutoGrades as _NbgraderSaveAutoGrades
    from traitlets import Enum, Integer
except ImportError:  # pragma: no cover - the grader always has nbgrader
    _NbgraderExecute = _NbgraderSaveAutoGrades = None


if _NbgraderExecute is not None:

    class CourseExecute(_NbgraderExecute):
        """nbgrader's Execute, made safe for untrusted notebooks, with the judge at every graded cell."""

        max_output_bytes = Integer(1_000_000, help="output kept per cell; the rest is dropped").tag(config=True)
        notebook_timeout = Integer(1200, help="seconds for the whole notebook; later cells are not run").tag(config=True)
        responsive_timeout = Integer(15, help="seconds a kernel gets to answer after an interrupted cell").tag(config=True)
        judge_call_timeout = Integer(int(os.environ.get("COURSE_JUDGE_CALL_TIMEOUT", 60)),
                                     help="seconds one judge call into the kernel may take").tag(config=True)
        # the scores are final after the last cell: a graceful shutdown would only wait for the kernel's own atexit
        # hooks (seconds, and as long as a hostile kernel likes up to the kill); the sandbox's cgroup is killed anyway
        shutdown_kernel = Enum(["graceful", "immediate"], default_value="immediate",
                               help="how the kernel is stopped after the last cell").tag(config=True)
        judge_max_reply_mb = Integer(int(os.environ.get("COURSE_JUDGE_MAX_REPLY_MB", 64)),
                                     help="largest answer (MB) the judge reads from the kernel").tag(config=True)

        def __init__(self, *args, **kwargs):
            from course_judge.sandbox import SandboxKernelManager

            kwargs["kernel_manager_class"] = SandboxKernelManager
            super().__init__(*args, **kwargs)

        def preprocess(self, nb, resources=None, km=None):
            from course_judge.sandbox import SETUP_TIMES, sandbox_status

            self._course_stop: str | None = None
            self._course_t0 = time.monotonic()
            self._course_bytes: dict[tuple[int, str], int] = {}
            self._course_truncated: set[int] = set()
            self._course_verdicts: dict = {}
            self._course_section = str((resources or {}).get("nbgrader", {}).get("assignment") or os.environ.get("COURSE_SECTION", ""))
            self._course_clock = {"first": None, "last": None, "judge": 0.0, "channel": 0.0, "calls": 0}
            ok, how = sandbox_status()
            if not ok:
                note("unsandboxed", how)
                self.log.warning("!!! %s", how)
            t_start = time.monotonic()
            launched = os.environ.get("COURSE_LAUNCHED_AT")  # the batch's wall clock when it started this process
            nbgrader_start_s = time.time() - float(launched) if launched else None
            nb, resources = super().preprocess(nb, resources, km)
            t_done = time.monotonic()
            resources["course_verdicts"] = {gid: v.to_json() for gid, v in self._course_verdicts.items()}
            c = self._course_clock
            note("timing", "grading time", execution_s=(c["last"] - c["first"]) if c["first"] is not None else None,
                 kernel_start_s=(c["first"] - t_start) if c["first"] is not None else None,
                 judge_s=c["judge"], channel_s=c["channel"], judge_calls=c["calls"], nbgrader_start_s=nbgrader_start_s,
                 shutdown_s=(t_done - c["last"]) if c["last"] is not None else None,
                 **SETUP_TIMES,
                 after_s_from=time.time())
            return nb, resources

        # -- the grader's benchmark lock: benchmark exercises exclusive, every other cell shared
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

        async def _stop(self, gid: str, why: str) -> None:
            self._course_stop = why
            note("kernel_stopped", f"{why} (at {gid}); later cells were not run", cell=gid)
            try:
                await self.km._async_shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - already dead
                pass

        async def _stop_at(self, cell, index: int, ename: str, why: str) -> None:
            cell.outputs.append(error_output(ename, why))
            await self._stop(_nbgrader_meta(cell).get("grade_id") or f"cell {index}", why)

        # -- the judge
        def _course_release(self) -> dict | None:
            """The released notebook of this section (the scaffolding every answer starts from), or None."""
            if not hasattr(self, "_course_release_nb"):
                root = Path(os.environ.get("COURSE_ROOT") or ".")
                path = root / "release" / self._course_section / f"{self._course_section}.ipynb"
                try:
                    self._course_release_nb = json.loads(path.read_text())
                except (OSError, ValueError):
                    self._course_release_nb = None
            return self._course_release_nb

        async def _judge(self, cell) -> None:
            import nbformat

            import course_judge
            from course_judge import static
            from course_judge import verdict as V
            from course_judge.kernel import KernelChannel
            from course_judge.session import Session

            meta = _nbgrader_meta(cell)
            gid, points = str(meta.get("grade_id")), float(meta.get("points", 0))
            module = course_judge.find(self._course_section, gid)
            t0 = time.monotonic()
            if module is None:
                v = V.Verdict(gid, points, parts=[V.PartResult("judge", points, False, "no judge module grades this cell")])
                note("grading_failed", f"no judge module for {self._course_section}/{gid}: scored 0", cell=gid)
            elif self._course_stop is not None:
                v = V.not_run(module, self._course_stop)
            else:
                rejected = static.rejection(self.nb, module)
                review = static.similarity_review(self.nb, module, self._course_release())
                timeout = float(self._get_timeout(cell) or self.judge_call_timeout)
                limit = self.judge_max_reply_mb << 20
                channel = KernelChannel(self, asyncio.get_running_loop(), responsive_timeout=self.responsive_timeout,
                                        max_reply_bytes=limit)
                session = Session(channel, timeout=min(self.judge_call_timeout, timeout), deadline=time.monotonic() + timeout,
                                  max_reply_bytes=limit)
                try:
                    v = await asyncio.to_thread(V.run, module, session, rejected=rejected, review=review,
                                                source=static.answer_cells(self.nb, module.ANSWERS))
                except Exception as e:  # noqa: BLE001 - a bug in a judge must not stop the batch
                    v = V.Verdict(gid, points, parts=[V.PartResult("judge", points, False, f"the judge failed: {type(e).__name__}: {e}")])
                    note("grading_failed", f"the judge of {gid} failed ({type(e).__name__}: {str(e)[:200]}): scored 0", cell=gid)
                self._course_clock["channel"] += session.channel_seconds
                self._course_clock["calls"] += session.calls
                if channel.dead:
                    await self._stop(gid, channel.dead)
                if v.rejected:
                    note("reference_use", f"{gid}: {v.rejected}", cell=gid)
                for why in v.review:
                    note("suspicious", f"{gid}: {why}", cell=gid)
            self._course_clock["judge"] += time.monotonic() - t0
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=v.report() + "\n")]
            cell.execution_count = None
            self._course_verdicts[gid] = v
            note("verdict", f"{gid}: {v.score}/{v.points}", verdict=v.to_json())

        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if cell.cell_type != "code":
                return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
            clock = self._course_clock
            if clock["first"] is None:
                clock["first"] = time.monotonic()
            try:
                if is_test_cell(cell):  # graded: the judge decides; the cell's code never reaches the kernel
                    fh = self._lock(cell)
                    try:
                        await self._judge(cell)
                    finally:
                        self._unlock(fh)
                    return cell
                return await self._execute_learner_cell(cell, cell_index, execution_count, store_history)
            finally:
                clock["last"] = time.monotonic()

        async def _execute_learner_cell(self, cell, cell_index, execution_count, store_history):
            if not cell.source.strip():
                return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
            if self._course_stop is None and time.monotonic() - self._course_t0 > self.notebook_timeout:
                self._course_stop = f"the notebook ran past its total time limit of {self.notebook_timeout} s"
                note("notebook_timeout", self._course_stop)
            if self._course_stop is not None:
                cell.outputs = [error_output("CellNotRun", f"not run: {self._course_stop}")]
                return cell
            fh = self._lock(cell)
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
                await self._stop_at(cell, cell_index, "CellTimeoutError", "the kernel did not stop when this cell ran past its time limit")
                return cell
            except DeadKernelError:
                await self._stop_at(cell, cell_index, "KernelDied", "the kernel died (memory or CPU limit, a crash, or exit() in the code)")
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

    class CourseSaveAutoGrades(_NbgraderSaveAutoGrades):
        """nbgrader's SaveAutoGrades, scoring every graded cell by the judge's verdict (never by its output)."""

        def _add_score(self, cell, resources):
            gid = cell.metadata["nbgrader"]["grade_id"]
            grade = self.gradebook.find_grade(gid, self.notebook_id, self.assignment_id, self.student_id)
            v = (resources.get("course_verdicts") or {}).get(gid)
            grade.auto_score = 0.0 if v is None else (None if v.get("score") is None else float(v["score"]))
            grade.needs_manual_grade = grade.manual_score is not None or grade.auto_score is None
            self.gradebook.db.commit()
