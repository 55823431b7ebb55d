"""A ``dask scheduler`` CLI process and ``dask worker`` CLI processes on this machine, as separate grading "nodes".

Each worker gets its own ``--local-directory``, ``--nthreads SLOTS`` and ``--resources host=1`` (what
``course_judge/dask_batch.py`` expects of one worker per host), and runs under a nanny that restarts it when it
dies. For trying the cluster path of ``make autograde`` and for the tests and the measurement script:

    python tools/dask_nodes.py --workers 2 --port 18791     # prints the address; Ctrl-C stops everything
    COURSE_DASK_SCHEDULER=tcp://127.0.0.1:18791 make autograde
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
COURSE = Path(__file__).resolve().parents[1]


class CliCluster:
    def __init__(self, base: Path, workers: int = 2, slots: int = 1, port: int = 18791, env: dict | None = None):
        self.address = f"tcp://127.0.0.1:{port}"
        base.mkdir(parents=True, exist_ok=True)
        path = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False",  # graders are the worker's children
                    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning",
                    # this checkout's course_judge (the tasks' module), whatever the venv's editable install points at
                    "PYTHONPATH": os.pathsep.join([str(COURSE), *([path] if path else [])]), **(env or {})}
        self.logs = base
        self.scheduler = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                                    "--no-dashboard"])
        self.workers = [self._spawn(f"worker{i}", ["worker", self.address, "--nthreads", str(slots), "--nworkers", "1",
                                                   "--resources", "host=1", "--memory-limit", "0", "--no-dashboard",
                                                   "--name", f"node{i}", "--local-directory", str(base / f"node{i}")])
                        for i in range(workers)]
        self._wait(workers)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the process keeps it
        return subprocess.Popen([str(VENV_BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)

    def _wait(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as c:
            c.wait_for_workers(n, timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        """Worker name -> pid of the worker process itself (the nanny's child), from the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=30) as c:
            return c.run(os.getpid)

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--port", type=int, default=18791)
    ap.add_argument("--dir", type=Path, default=Path(".cache/dask-nodes"))
    ns = ap.parse_args()
    cluster = CliCluster(ns.dir, ns.workers, ns.slots, ns.port)
    print(f"COURSE_DASK_SCHEDULER={cluster.address}  ({ns.workers} workers x {ns.slots} slots; logs in {ns.dir})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
