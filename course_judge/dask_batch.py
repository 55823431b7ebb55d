"""The batch's grading pool on Dask ``distributed``: an embedded LocalCluster, or the cluster at ``COURSE_DASK_SCHEDULER``.

One task per submission; the task calls ``tools/course.py``'s ``grade_submission`` on a worker, which grades the
submission in its own sandboxed nbgrader process exactly as a single-machine batch does, and returns the record as
plain data (the client rebuilds its own ``Record``; nothing of the worker's classes crosses).

Hosts: every worker advertises one unit of the resource ``host`` (``--resources host=1``) and runs as many grading
slots as it has threads (``--nthreads``); a deployment runs one worker per host. An ordinary submission asks for a
sliver of its host (``2**-10``, exact in binary, so slivers add back to exactly 1); a submission of a section with
benchmark cells asks for the whole unit, so nothing else grades on that host while it runs. Inside one host the
grader's lock (``COURSE_GRADER_LOCK``, a host-local file) still keeps benchmark cells apart from every other cell,
as on a single machine.

Failures: a worker that dies mid-task (killed, out of memory) takes its nbgrader process and sandbox with it (they
die with their parent); the scheduler gives the submission to a worker again, and after
``distributed.scheduler.allowed-failures`` deaths the client records it as failed (0 and ``grading_failed``, never
an old grade). The client never stops for one submission.

This module runs in the grader only; no kernel can import it (the sandbox binds ``course_lib`` alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

HOST = "host"  # the per-host resource every worker advertises (1 unit)
SLIVER = 2.0**-10  # what an ordinary submission takes of its host
ENV = "COURSE_DASK_SCHEDULER"


def scheduler_address() -> str | None:
    return os.environ.get(ENV) or None


def has_bench_cells(notebook: Path) -> bool:
    """Does the section's source notebook hold a benchmark cell (grade id ``bench_*``)?"""
    try:
        nb = json.loads(notebook.read_text())
    except (OSError, ValueError):
        return False
    return any(str(c.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")).startswith("bench_") for c in nb.get("cells", []))


def host_lock(root: Path) -> Path:
    """The grader's benchmark lock of this course on this host (a local file: hosts never wait for each other)."""
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"course-grader-{tag}.lock"


def grade_task(root: str, student: str, section: str, force: bool) -> dict:
    """Runs on a worker: grade one submission, return its record as a dict (``tools/course.py``'s ``Record``)."""
    import multiprocessing

    from distributed import get_worker

    tools = str(Path(root) / "tools")
    here = str(Path(__file__).resolve().parents[1] / "tools")
    for p in (here, tools):
        if p not in sys.path:
            sys.path.insert(0, p)
    import course

    worker = get_worker()
    slots = max(1, int(worker.state.nthreads))
    course._BATCH_WORKERS = slots  # the kernels' default CPU quota: this host's CPUs / its grading slots
    if multiprocessing.current_process().daemon:  # a daemonic worker may not start the fork server's children
        course._MP = False
    rec = course.grade_submission(Path(root), student, section, force)
    out = {k: getattr(rec, k) for k in type(rec).__dataclass_fields__ if k != "verdicts"}
    out["timing"] = {**out["timing"], "worker": str(worker.name)}  # where it was graded (summary.json)
    return out


def request(bench: bool) -> dict[str, float]:
    """The resources one submission asks of its worker: the whole host for a section with benchmark cells."""
    return {HOST: 1.0 if bench else SLIVER}


def _worker_slots(client) -> int:
    info = client.scheduler_info(n_workers=-1)["workers"]
    missing = [a for a, w in info.items() if HOST not in (w.get("resources") or {})]
    if missing:
        raise SystemExit(f"Dask workers {', '.join(missing)} advertise no {HOST!r} resource: start each with "
                         f"`dask worker {client.scheduler.address} --nthreads N --resources {HOST}=1` (one worker per host)")
    return sum(int(w.get("nthreads", 1)) for w in info.values())


@contextlib.contextmanager
def client(root: Path, workers: int) -> Iterator[tuple[object, int, str]]:
    """(a distributed Client, grading slots, a line saying where) for one batch."""
    import dask
    from distributed import Client, LocalCluster

    addr = scheduler_address()
    if addr:
        with Client(addr, timeout=60) as c:
            c.wait_for_workers(1, timeout=float(os.environ.get("COURSE_DASK_WAIT_S", 300)))
            slots = _worker_slots(c)
            yield c, slots, f"Dask scheduler {addr}: {len(c.scheduler_info(n_workers=-1)['workers'])} workers, {slots} grading slots"
        return
    local = root / "autograded" / ".batch" / "dask"
    local.mkdir(parents=True, exist_ok=True)
    cfg = {"distributed.worker.daemon": False,  # its grading processes are children of the worker
           # a dead worker counts against every task it held, started or queued: Dask's default of 3 lets them retry
           "distributed.scheduler.allowed-failures": int(os.environ.get("COURSE_DASK_ALLOWED_FAILURES", 3)),
           "distributed.worker.memory.terminate": False, "distributed.worker.memory.pause": False,
           "distributed.logging.distributed": "error"}
    with dask.config.set(cfg), LocalCluster(n_workers=1, threads_per_worker=workers, processes=True, resources={HOST: 1},
                                            memory_limit=0, dashboard_address=None, host="127.0.0.1",
                                            local_directory=str(local), silence_logs=40) as cluster, Client(cluster) as c:
        yield c, workers, f"embedded Dask LocalCluster: 1 worker process, {workers} grading slots"


def grade_all(root: Path, todo: list[tuple[str, str]], force: bool, workers: int,
              done: Callable[[str, str, dict | None, BaseException | None], None], task: Callable = grade_task) -> tuple[int, str]:
    """Grade every (student, section) of ``todo``; ``done(student, section, record dict or None, error or None)`` is
    called on the client as each finishes, in completion order. Returns (grading slots, where).

    ``task(root, student, section, force)`` runs on a worker (``grade_task``; the tests pass their own)."""
    from distributed import as_completed

    bench = {a: has_bench_cells(root / "source" / a / f"{a}.ipynb") for a in {a for _, a in todo}}
    with client(root, workers) as (c, slots, where):
        print(where, flush=True)
        futs = {}
        for s, a in todo:
            fut = c.submit(task, str(root), s, a, force, key=f"grade-{s}-{a}-{os.urandom(4).hex()}",
                           resources=request(bench[a]), pure=False)
            futs[fut] = (s, a)
        for fut in as_completed(futs):
            s, a = futs[fut]
            try:
                res, err = fut.result(), None
            except BaseException as e:  # noqa: BLE001 - KilledWorker, a lost scheduler, a bug: this submission only
                if isinstance(e, KeyboardInterrupt):
                    raise
                res, err = None, e
            done(s, a, res, err)
            fut.release()
    return slots, where
