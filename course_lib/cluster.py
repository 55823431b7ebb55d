"""Process groups for the course: spawned gloo workers, a differentiable all-to-all, the expert-parallel harness.

The given half of Section 6's distributed code (the learner writes expert-parallel dispatch and combine in
Exercise 6.4; the course's reference version is ``course_lib.distributed``). It runs in three places:

- from a notebook kernel or pytest: ``get_cluster(2)`` spawns worker processes (start method
  ``"spawn"``, so Linux and macOS behave alike) that join a gloo process group and stay up; each
  ``cluster.run(fn, ...)`` runs ``fn`` on every rank and returns the per-rank results. Start-up (a few
  seconds: every worker imports torch) is paid once per kernel;
- under ``torchrun`` on GPUs (``torchrun --nproc-per-node 8 -m course_lib.distributed``, NCCL);
- in a single process (``world_size == 1``), where every collective is the identity.

Notebook-defined functions cannot be pickled through ``spawn`` (the workers cannot import the
notebook). ``Cluster.run`` therefore ships a function defined in ``__main__`` by its *source*, with
the modules, values and other notebook functions it refers to (by its code object when no source is
known, e.g. code run by ``exec``); functions from importable modules go by reference. Keep functions
you run on workers at the top level of a cell.

What is here: the cluster (:class:`Cluster`, :func:`get_cluster`), :func:`all_to_all` (autograd:
the backward is the same exchange with the splits swapped; it checks that the ranks agree on the split
sizes before any row moves, so a mismatch is an error on every rank instead of a hang),
:func:`allreduce_gradients`, :class:`DispatchPlan` (what combine needs), :func:`run_local_experts`,
the jobs (:func:`dp_job`, :func:`ep_job`, :func:`ep_trial`) and their single-process oracles
(:func:`single_process_reference`, :func:`moe_reference`), and routing statistics
(:func:`routing_traffic`, :func:`capacity_drop`).
"""

from __future__ import annotations

import ast
import atexit
import builtins
import contextlib
import datetime
import functools
import importlib
import inspect
import io
import marshal
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Cluster",
    "WorkerError",
    "get_cluster",
    "shutdown_cluster",
    "run",
    "rank",
    "world_size",
    "all_to_all",
    "check_splits",
    "allreduce_gradients",
    "DispatchPlan",
    "run_local_experts",
    "expert_range",
    "moe_reference",
    "make_moe",
    "single_process_reference",
    "compare_ep",
    "routing_traffic",
    "capacity_drop",
    "job_device",
    "dp_job",
    "ep_job",
    "ep_trial",
]


# --------------------------------------------------------------------------------------------------
# Process-group helpers
# --------------------------------------------------------------------------------------------------


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _loopback_ifname() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


# --------------------------------------------------------------------------------------------------
# Shipping notebook functions to workers (by source)
# --------------------------------------------------------------------------------------------------

_SHIPPED: dict[tuple[str, str | bytes], Callable] = {}


def _importable(obj: object) -> bool:
    """True when ``obj`` can be found again by ``import module; getattr(module, qualname)``."""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None)
    if not mod or not qual or mod in ("__main__", "__mp_main__") or "<locals>" in qual:
        return False
    try:
        target: object = importlib.import_module(mod)
        for part in qual.split("."):
            target = getattr(target, part)
    except Exception:
        return False
    return target is obj


def _names_used(source: str) -> set[str]:
    """Every bare name loaded anywhere in ``source`` (body, decorators, defaults, annotations)."""
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


def _code_names(code: types.CodeType) -> set[str]:
    """Global (and attribute) names a code object and the code nested in it refer to."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def _ship_deps(fn: types.FunctionType, names: set[str], stack: tuple[str, ...]) -> dict[str, bytes]:
    """The modules, values and notebook functions among ``names`` that ``fn``'s globals hold, pickled."""
    deps: dict[str, bytes] = {}
    for name in sorted(names):
        if name == fn.__name__ or name not in fn.__globals__ or name in stack:
            continue
        value = fn.__globals__[name]
        if isinstance(value, types.ModuleType):
            deps[name] = pickle.dumps(("module", value.__name__))
            continue
        buf = io.BytesIO()
        try:
            _ShipPickler(buf, stack + (fn.__name__,)).dump(value)
        except Exception:  # not shippable (e.g. an open file): the worker reports a NameError if it is used
            continue
        deps[name] = pickle.dumps(("value", buf.getvalue()))
    return deps


def _function_payload(fn: types.FunctionType, _stack: tuple[str, ...] = ()) -> tuple:
    """How ``fn`` travels: ``(_rebuild_function, (name, source, deps))``, or by code object without a source."""
    if fn.__closure__:
        raise TypeError(
            f"cannot ship {fn.__name__!r} to worker processes: it is a closure (it uses variables of an "
            "enclosing function). Define it at the top level of a cell and pass those values as arguments."
        )
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == fn.__name__ for n in tree.body):
            source = None  # linecache held some other file's lines under this name
    except (OSError, TypeError, SyntaxError):
        source = None
    if source is None:  # code run by exec() (no linecache entry): the workers run the same interpreter
        buf = io.BytesIO()
        _ShipPickler(buf, _stack + (fn.__name__,)).dump((fn.__defaults__, fn.__kwdefaults__))
        deps = _ship_deps(fn, _code_names(fn.__code__), _stack)
        return _rebuild_code, (fn.__name__, marshal.dumps(fn.__code__), deps, buf.getvalue())
    return _rebuild_function, (fn.__name__, source, _ship_deps(fn, _names_used(source), _stack))


def _namespace(deps: dict[str, bytes]) -> dict[str, object]:
    ns: dict[str, object] = {"__name__": "__shipped__", "__builtins__": builtins}
    for dep, blob in deps.items():
        kind, payload = pickle.loads(blob)
        ns[dep] = importlib.import_module(payload) if kind == "module" else pickle.loads(payload)
    return ns


def _rebuild_function(name: str, source: str, deps: dict[str, bytes]) -> Callable:
    key = (name, source)
    if key in _SHIPPED:
        return _SHIPPED[key]
    ns = _namespace(deps)
    exec(compile(source, f"<shipped {name}>", "exec"), ns)
    fn = ns[name]
    _SHIPPED[key] = fn
    return fn


def _rebuild_code(name: str, code: bytes, deps: dict[str, bytes], defaults: bytes) -> Callable:
    key = (name, code)
    if key in _SHIPPED:
        return _SHIPPED[key]
    ns = _namespace(deps)
    args, kwargs = pickle.loads(defaults)
    fn = types.FunctionType(marshal.loads(code), ns, name, args)
    fn.__kwdefaults__ = kwargs
    ns[name] = fn  # recursion finds itself
    _SHIPPED[key] = fn
    return fn


class _ShipPickler(pickle.Pickler):
    """A pickler that sends functions defined in a notebook (``__main__``) by source."""

    def __init__(self, file, stack: tuple[str, ...] = ()) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._stack = stack

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and not _importable(obj):
            return _function_payload(obj, self._stack)
        return NotImplemented


def _dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _ShipPickler(buf).dump(obj)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A function raised on one or more ranks; the message holds each rank's traceback."""

    def __init__(self, message: str, exc_types: Sequence[str]) -> None:
        super().__init__(message)
        self.exc_types = list(exc_types)


def _worker_main(rank_: int, world: int, backend: str, store_path: str, log_path: str, conn, threads: int,
                 collective_timeout: float) -> None:
    """Entry point of one spawned worker: join the group, then run jobs from ``conn`` until told to stop."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # keep worker output out of the notebook (stderr in a graded cell would zero it)
    os.dup2(fd, 2)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_ifname())
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank_, world_size=world,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        conn.send(("ready", rank_, None))
    except Exception:
        conn.send(("error", rank_, traceback.format_exc()))
        return
    parent_gone = False
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent has gone (a kernel killed without clean-up): exit quietly
                parent_gone = True
                break
            if msg is None:
                break
            job_id, blob = msg
            try:
                fn, args, kwargs = pickle.loads(blob)
                out = fn(*args, **kwargs)
                reply = ("ok", job_id, pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
            except BaseException as e:  # report every failure, including NotImplementedError from stubs
                reply = ("error", job_id, (type(e).__name__, traceback.format_exc()))
            try:
                conn.send(reply)
            except (BrokenPipeError, OSError):
                break
    finally:
        if parent_gone and rank_ == 0:  # nobody else will remove the rendezvous folder
            shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
        # Leave at once: a full interpreter teardown (destroying the gloo group, unloading torch) takes
        # seconds on a busy machine, and the parent removes the rendezvous folder after a clean close.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Cluster:
    """``world_size`` spawned worker processes in one process group, reused across ``run`` calls.

    >>> with Cluster(2) as cl:
    ...     ranks = cl.run(rank)          # [0, 1]

    ``run(fn, *args, **kwargs)`` calls ``fn(*args, **kwargs)`` on every rank and returns the results in
    rank order. Inside ``fn``, ``dist.get_rank()`` tells the ranks apart. A call that does not finish
    within ``timeout`` seconds (a hang: ranks disagreeing on a collective) kills the workers and raises
    ``TimeoutError``; an exception on any rank raises ``WorkerError`` (after ``error_grace`` seconds at most,
    since the other ranks may be blocked in a collective waiting for the failed one). After a failure the cluster is
    restarted on the next ``run`` unless every rank failed cleanly before a mismatched collective.
    """

    def __init__(self, world_size: int = 2, *, backend: str | None = None, timeout: float = 60.0,
                 start_timeout: float = 120.0, threads: int = 1, wait: bool = True) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend or "gloo"
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.threads = threads
        self.error_grace = 5.0  # seconds the other ranks get to finish once one rank has failed
        self._procs: list = []
        self._conns: list = []
        self._job = 0
        self._dir: str | None = None
        self.startup_seconds = float("nan")
        self._ready = False
        self._start(wait)

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def log_path(self) -> str:
        return os.path.join(self._dir or "", "workers.log")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def _start(self, wait: bool = True) -> None:
        """Spawn the workers; with ``wait`` also block until all joined the group (else ``run`` waits)."""
        self._t0 = time.perf_counter()
        self._ready = False
        self._dir = tempfile.mkdtemp(prefix="course_dist_")
        store = os.path.join(self._dir, "store")
        ctx = mp.get_context("spawn")
        for r in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, daemon=True, name=f"course-dist-rank{r}",
                            args=(r, self.world_size, self.backend, store, self.log_path, child, self.threads,
                                  max(self.timeout, 30.0)))
            with _main_hidden():
                p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker has joined the process group (no-op when already up)."""
        if self._ready:
            return
        deadline = time.monotonic() + self.start_timeout
        for r, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.close(kill=True)
                raise TimeoutError(f"worker {r} did not join the process group within {self.start_timeout:.0f} s")
            kind, _, info = conn.recv()
            if kind != "ready":
                self.close(kill=True)
                raise RuntimeError(f"worker {r} failed to initialise torch.distributed:\n{info}")
        self.startup_seconds = time.perf_counter() - self._t0
        self._ready = True

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely unless ``kill``) and remove the rendezvous folder."""
        for conn in self._conns:
            if not kill:
                with contextlib.suppress(Exception):
                    conn.send(None)
        for p in self._procs:
            if not kill:
                p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._procs, self._conns = [], []
        self._ready = False
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self) -> None:
        self.close(kill=True)
        self._start()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    # -- running jobs ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, timeout: float | None = None, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self.alive:
            self.restart()
        self.wait_ready()
        self._job += 1
        job = self._job
        blob = _dumps((fn, args, kwargs))
        for conn in self._conns:
            conn.send((job, blob))
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        results: list = [None] * self.world_size
        errors: dict[int, tuple[str, str]] = {}
        pending = set(range(self.world_size))
        while pending:
            ready = mp.connection.wait([self._conns[r] for r in pending], timeout=max(0.0, deadline - time.monotonic()))
            if not ready and errors:  # some ranks failed, the others wait in a collective for them: report the failure
                self.close(kill=True)
                msg = "\n".join(f"--- rank {r}: {errors[r][1].rstrip()}" for r in sorted(errors))
                raise WorkerError(
                    f"{getattr(fn, '__name__', fn)} raised {errors[min(errors)][0]} on rank(s) {sorted(errors)} while rank(s) "
                    f"{sorted(pending)} waited for them in a collective (the workers were restarted):\n{msg}",
                    [errors[r][0] for r in sorted(errors)])
            if not ready:
                self.close(kill=True)
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)} did not finish on rank(s) {sorted(pending)} within {limit:.0f} s: "
                    "usually the ranks disagree on a collective (different split sizes, or one rank skipped a "
                    "collective the others entered). The workers were stopped; the next run starts new ones."
                )
            for conn in ready:
                r = self._conns.index(conn)
                try:
                    kind, jid, payload = conn.recv()
                except (EOFError, OSError):
                    tail = self._log_tail()
                    self.close(kill=True)
                    raise RuntimeError(
                        f"worker {r} died while running {getattr(fn, '__name__', fn)} (gloo aborts the process when ranks "
                        f"pass inconsistent split sizes to all_to_all_single; the workers were restarted). Worker log:\n{tail}"
                    ) from None
                if jid != job:
                    continue
                pending.discard(r)
                if kind == "ok":
                    results[r] = pickle.loads(payload)
                else:
                    errors[r] = payload
                    deadline = min(deadline, time.monotonic() + self.error_grace)
        if errors:
            if len(errors) == self.world_size and self._healthy():
                pass  # every rank failed cleanly (e.g. an unimplemented stub): the group is still usable
            else:
                self.close(kill=True)
            first = min(errors)
            msg = "\n".join(f"--- rank {r}: {errors[r][1].rstrip()}" for r in sorted(errors))
            raise WorkerError(f"{getattr(fn, '__name__', fn)} raised {errors[first][0]} on rank(s) {sorted(errors)}:\n{msg}",
                              [errors[r][0] for r in sorted(errors)])
        return results

    def _healthy(self) -> bool:
        try:
            self.run(_barrier, timeout=10.0)
            return True
        except Exception:
            return False


@contextlib.contextmanager
def _main_hidden():
    """Hide ``__main__`` while spawning, so workers never re-run the caller's script or notebook.

    ``spawn`` normally re-imports the parent's main module in every child (hence the
    ``if __name__ == "__main__"`` idiom); the workers need nothing from it because notebook functions
    travel by source.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _barrier() -> bool:
    dist.barrier()
    return True


_CLUSTERS: dict[tuple[int, str], Cluster] = {}


def get_cluster(world_size: int = 2, *, backend: str | None = None, timeout: float = 60.0, wait: bool = True) -> Cluster:
    """The kernel-wide cluster of ``world_size`` gloo workers (started on first use, restarted if dead).

    ``wait=False`` starts the workers in the background and returns at once: call it early, and the
    workers import torch while other cells run; the first ``run`` waits for them.
    """
    key = (world_size, backend or "gloo")
    cl = _CLUSTERS.get(key)
    if cl is None:
        cl = _CLUSTERS[key] = Cluster(world_size, backend=backend, timeout=timeout, wait=wait)
    elif wait:
        cl.wait_ready()
    cl.timeout = timeout
    return cl


def shutdown_cluster() -> None:
    """Stop every cluster this process started."""
    for cl in _CLUSTERS.values():
        cl.close()
    _CLUSTERS.clear()


def run(fn: Callable, *args, world_size: int = 2, timeout: float = 60.0, **kwargs) -> list:
    """``get_cluster(world_size).run(fn, *args, **kwargs)``: results of every rank, in rank order."""
    return get_cluster(world_size).run(fn, *args, timeout=timeout, **kwargs)


atexit.register(shutdown_cluster)


# --------------------------------------------------------------------------------------------------
# Differentiable collectives and data parallelism
# --------------------------------------------------------------------------------------------------


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd: the backward sends gradients back along the reversed splits.

    Forward: rank r sends rows ``send_counts[j]`` to rank j and receives ``recv_counts[j]`` rows from
    rank j (rows arrive grouped by source rank, in rank order). Backward: the same exchange with
    ``send_counts`` and ``recv_counts`` swapped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group, _anchor: torch.Tensor):
        ctx.splits = (send_counts, recv_counts, group)
        out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_counts, recv_counts, group = ctx.splits
        gx = grad.new_empty((sum(send_counts),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), output_split_sizes=send_counts, input_split_sizes=recv_counts,
                               group=group)
        return gx, None, None, None, None


_ANCHOR = torch.empty(0, requires_grad=True)


def _split_problem(x: torch.Tensor, send: list[int], recv: list[int], W: int) -> str:
    if len(send) != W or len(recv) != W:
        return f"send_counts {send} and recv_counts {recv} need one entry per rank ({W} ranks)"
    if min(send + recv) < 0:
        return f"negative split sizes: send_counts {send}, recv_counts {recv}"
    if x.shape[0] != sum(send):
        return f"x has {x.shape[0]} rows but send_counts {send} add up to {sum(send)}"
    return ""


def check_splits(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None = None) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks agree on the split sizes of an all-to-all.

    Each rank's ``recv[j]`` must be what rank j sends it (``send[r]`` there). Checked with two small
    collectives before any row moves, so inconsistent splits are an error on every rank, not a hang or
    a crashed worker (gloo aborts the process on inconsistent ``all_to_all_single`` splits).
    """
    W, r = world_size(group), rank(group)
    problem = _split_problem(x, send, recv, W)
    sent = torch.tensor((send + [0] * W)[:W], dtype=torch.int64, device=x.device)  # (W,) what I send to each rank
    arriving = torch.empty_like(sent)
    dist.all_to_all_single(arriving, sent, group=group)  # (W,) what each rank sends me
    if not problem and arriving.tolist() != recv:
        problem = (f"recv_counts {recv} disagree with what the ranks send to rank {r} ({arriving.tolist()}): "
                   "exchange the send counts first (dist.all_to_all_single on an int64 tensor of W counts)")
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64, device=x.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag):
        problems: list = [None] * W
        dist.all_gather_object(problems, problem, group=group)
        raise ValueError("all_to_all: " + "; ".join(f"rank {i}: {p}" for i, p in enumerate(problems) if p))


def all_to_all(x: torch.Tensor, send_counts: Sequence[int] | torch.Tensor, recv_counts: Sequence[int] | torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Exchange rows of ``x`` (S, ...) between ranks; returns (sum(recv_counts), ...). Differentiable.

    ``send_counts[j]`` consecutive rows of ``x`` go to rank j; the result holds ``recv_counts[j]`` rows
    from each rank j, in rank order. Integer tensors (e.g. expert ids) go through too, without autograd.
    When grad mode is on, every rank runs the backward exchange even if it sent or received nothing
    (otherwise the other ranks would wait for it forever). Split sizes the ranks disagree on raise a
    ``ValueError`` on every rank (:func:`check_splits`).
    """
    send = [int(c) for c in send_counts]
    recv = [int(c) for c in recv_counts]
    if world_size(group) == 1:
        problem = _split_problem(x, send, recv, 1) or ("" if send == recv else f"recv_counts {recv} != send_counts {send}")
        if problem:
            raise ValueError(f"all_to_all: {problem}")
        return x
    check_splits(x, send, recv, group)
    if x.is_floating_point() and torch.is_grad_enabled():
        return AllToAll.apply(x, send, recv, group, _ANCHOR)
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def allreduce_gradients(params: nn.Module | Sequence[nn.Parameter], *, average: bool = False,
                        group: dist.ProcessGroup | None = None) -> None:
    """Data parallelism: sum (or average) ``.grad`` of replicated parameters over all ranks, in place.

    Sum when each rank's loss is its share of a global sum (``L = sum_r L_r``); average when each rank
    computed the mean over its own equally sized shard. Parameters without a gradient get zeros first,
    so every rank joins every all-reduce in the same order.
    """
    ps = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    if world_size(group) == 1:
        return
    for p in ps:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        if average:
            p.grad /= world_size(group)


# --------------------------------------------------------------------------------------------------
# Expert parallelism: dispatch and combine
# --------------------------------------------------------------------------------------------------


def expert_range(n_experts: int, world: int, r: int) -> tuple[int, int]:
    """Experts ``[lo, hi)`` owned by rank ``r``: contiguous blocks of ``n_experts / world``."""
    if n_experts % world:
        raise ValueError(f"n_experts ({n_experts}) must be divisible by the number of ranks ({world})")
    per = n_experts // world
    return r * per, (r + 1) * per


@dataclass
class DispatchPlan:
    """What combine needs to send results back and sum them per token.

    ``order``: (N*K,) positions of the sorted (token, expert) pairs in ``topk_idx.flatten()``;
    ``token_of``: (N*K,) the token each sent row came from; ``send_counts``/``recv_counts``: rows sent
    to / received from each rank (lists of ints); ``n_tokens``: N.
    """

    order: torch.Tensor
    token_of: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    n_tokens: int


def run_local_experts(recv_x: torch.Tensor, recv_expert: torch.Tensor, experts: Sequence[nn.Module]) -> torch.Tensor:
    """Apply local expert ``e`` to the rows with ``recv_expert == e``; returns (R, D) in the input row order.

    Rows are grouped by expert with a stable sort and split, so an expert that received nothing still
    runs on a (0, D) slice: its weights get zero gradients and the output stays connected to ``recv_x``
    (every rank then takes part in the backward all-to-all).
    """
    perm = torch.argsort(recv_expert, stable=True)  # (R,)
    counts = torch.bincount(recv_expert, minlength=len(experts)).tolist()
    if len(counts) > len(experts):
        raise ValueError(f"received expert id {int(recv_expert.max())} but this rank holds {len(experts)} experts")
    chunks = recv_x[perm].split(counts)  # per-expert (n_e, D) slices
    y_sorted = torch.cat([e(c) for e, c in zip(experts, chunks)])  # (R, D)
    return y_sorted[torch.argsort(perm)]  # undo the sort: (R, D)



def moe_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, experts: Sequence[nn.Module],
                  shared: nn.Module | None = None) -> torch.Tensor:
    """Single-process MoE, one token at a time: ``y_t = shared(x_t) + sum_k w_tk E_{idx_tk}(x_t)``. (N, D)."""
    rows = []
    for t in range(x.shape[0]):
        y = shared(x[t : t + 1])[0] if shared is not None else torch.zeros_like(x[t])
        for k in range(topk_idx.shape[1]):
            y = y + topk_weight[t, k].to(x.dtype) * experts[int(topk_idx[t, k])](x[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[-1])


def _split_moe(moe: nn.Module):
    """(router, experts, shared) of a DeepSeekMoE-like module; the router returns (topk_idx, topk_weight).

    Works with ``course_lib.deepseek.moe.MoE`` (whose gate returns ``(weights, indices, scores)``) and
    with any module that has ``gate``, ``experts`` and optionally ``shared_experts``.
    """
    gate = moe.gate
    experts = moe.experts
    shared = getattr(moe, "shared_experts", None)

    def router(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = gate(x)
        a, b = out[0], out[1]
        return (a, b) if not a.is_floating_point() else (b, a)  # (indices, weights) whatever the gate's order

    return router, experts, shared


def make_moe(seed: int = 0, *, dtype: torch.dtype = torch.float64, bias: Sequence[float] | None = None,
             parts: str | None = None, **cfg) -> nn.Module:
    """A ``course_lib.deepseek.moe.MoE`` built from ``seed`` (identical on every rank), in ``dtype``.

    ``cfg`` overrides ``MoEConfig`` fields (the balance loss is off); ``bias`` sets the gate's selection
    bias, the natural knob for skewed routing (a large bias on some experts sends every token to them).
    ``parts``: the path of the learner's saved Section 3 (``my_deepseek/s03_moe.py``, see ``course_lib.learner``):
    their ``MixtureOfExperts`` instead, loaded by every worker from that file.
    Pass ``functools.partial(make_moe, ...)`` to ``ep_job`` so every worker builds the same layer.
    """
    from course_lib.deepseek.moe import MoE, MoEConfig

    cls = MoE
    if parts is not None:
        from course_lib.learner import load_saved

        cls = load_saved(Path(parts)).MixtureOfExperts
    cfg.setdefault("seq_aux_alpha", 0.0)
    torch.manual_seed(seed)
    moe = cls(MoEConfig(**cfg)).to(dtype)
    if bias is not None:
        with torch.no_grad():
            moe.gate.bias.copy_(torch.as_tensor(bias, dtype=moe.gate.bias.dtype))
    return moe


# --------------------------------------------------------------------------------------------------
# Routing statistics: traffic across ranks, capacity and dropped tokens
# --------------------------------------------------------------------------------------------------


def routing_traffic(topk_idx: torch.Tensor, n_experts: int, world: int, token_rank: torch.Tensor | int) -> dict:
    """How much of a dispatch crosses ranks (nodes), for ``topk_idx`` (N, K) of tokens living on ``token_rank``.

    Returns ``rows_remote`` (token-expert pairs whose expert is on another rank: what a dispatcher
    that sends one row per pair moves), ``copies_remote`` (distinct (token, remote rank) pairs: what a
    dispatcher that sends each token once per destination rank moves, as DeepSeek-V3 does across
    nodes), their per-token means, and ``max_ranks_per_token`` (ranks touched, own rank included).
    """
    N, K = topk_idx.shape
    per = n_experts // world
    dest = topk_idx // per  # (N, K) destination rank of each pair
    src = torch.as_tensor(token_rank).expand(N) if not isinstance(token_rank, torch.Tensor) or token_rank.dim() == 0 \
        else token_rank
    remote = dest != src[:, None]  # (N, K)
    touched = torch.zeros(N, world, dtype=torch.bool)
    touched.scatter_(1, dest, True)  # (N, W) ranks each token visits
    own = torch.zeros_like(touched)
    own.scatter_(1, src[:, None].long(), True)
    copies = touched & ~own
    return {
        "tokens": N,
        "rows_remote": int(remote.sum()),
        "copies_remote": int(copies.sum()),
        "rows_remote_per_token": float(remote.sum()) / max(N, 1),
        "copies_remote_per_token": float(copies.sum()) / max(N, 1),
        "max_ranks_per_token": int(touched.sum(1).max()) if N else 0,
        "mean_ranks_per_token": float(touched.sum(1).float().mean()) if N else 0.0,
    }


def capacity_drop(topk_idx: torch.Tensor, n_experts: int, capacity_factor: float, *, world: int | None = None) -> dict:
    """Token dropping under a fixed capacity, first come first served in token order.

    Per expert (``world=None``): each expert takes at most ``ceil(cf * N*K / E)`` pairs. Per device
    (``world=W``, DeepSeek-V2's device-level dropping): each rank takes at most ``ceil(cf * N*K / W)``
    pairs over all its experts. Returns the capacity, the number and fraction of dropped pairs, and
    the load of every bin.
    """
    N, K = topk_idx.shape
    bins = n_experts if world is None else world
    key = topk_idx if world is None else topk_idx // (n_experts // world)  # (N, K) bin of each pair
    cap = math.ceil(capacity_factor * N * K / bins)
    load = torch.bincount(key.reshape(-1), minlength=bins)  # (bins,)
    dropped = int((load - cap).clamp_min(0).sum())
    return {"capacity": cap, "dropped": dropped, "drop_fraction": dropped / max(N * K, 1), "load": load}


# --------------------------------------------------------------------------------------------------
# Jobs: functions that run on every rank of a cluster (or under torchrun)
# --------------------------------------------------------------------------------------------------


def _shard(n: int, world: int, r: int, sizes: Sequence[int] | None = None) -> slice:
    """Rows of rank ``r`` when ``n`` rows are split into contiguous shards (``sizes`` or as even as possible)."""
    if sizes is None:
        base, extra = divmod(n, world)
        sizes = [base + (i < extra) for i in range(world)]
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def job_device() -> torch.device:
    """Where a job's tensors live: this rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dp_job(model_fn: Callable[[], nn.Module], x: torch.Tensor, target: torch.Tensor, *, average: bool = True) -> dict:
    """Data parallelism on one rank: forward/backward on this rank's shard, then all-reduce the gradients.

    Every rank builds the same model (``model_fn`` seeds), takes an equal shard of ``x`` and ``target``,
    computes the mean squared error on it and averages the gradients. Returns the averaged gradients.
    """
    W, r, dev = world_size(), rank(), job_device()
    model = model_fn().to(dev)
    sl = _shard(x.shape[0], W, r)
    loss = (model(x[sl].to(dev)) - target[sl].to(dev)).pow(2).mean()
    loss.backward()
    allreduce_gradients(model, average=average)
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


def _together(problem: str, what: str) -> None:
    """Raise ``ValueError`` on every rank when any rank found a ``problem`` (so no rank waits in a collective)."""
    W = world_size()
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64, device=job_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag):
        problems: list = [None] * W
        dist.all_gather_object(problems, problem)
        raise ValueError(f"{what}: " + "; ".join(f"rank {i}: {p}" for i, p in enumerate(problems) if p))


def _received_problem(recv_x, recv_expert, plan, n_local: int, D: int) -> str:
    """What is wrong with a dispatch's result on this rank, as run_local_experts and combine need it ("" if nothing)."""
    if not isinstance(recv_x, torch.Tensor) or recv_x.dim() != 2 or recv_x.shape[1] != D:
        return f"recv_x should be an (R, {D}) tensor, got {getattr(recv_x, 'shape', type(recv_x).__name__)}"
    if not isinstance(recv_expert, torch.Tensor) or recv_expert.dim() != 1 or recv_expert.is_floating_point():
        return f"recv_expert should be a 1-d integer tensor, got {getattr(recv_expert, 'dtype', type(recv_expert).__name__)}"
    if recv_expert.shape[0] != recv_x.shape[0]:
        return f"recv_expert has {recv_expert.shape[0]} entries for {recv_x.shape[0]} rows of recv_x"
    if recv_expert.numel() and (int(recv_expert.min()) < 0 or int(recv_expert.max()) >= n_local):
        lo, hi, first = int(recv_expert.min()), int(recv_expert.max()), rank() * n_local
        own = " (all of them this rank's GLOBAL expert ids)" if first <= lo and hi < first + n_local else ""
        return f"received expert ids {lo}..{hi}{own} but this rank holds {n_local} experts (local ids 0..{n_local - 1})"
    for field in ("order", "token_of", "send_counts", "recv_counts", "n_tokens"):
        if not hasattr(plan, field):
            return f"the plan has no {field!r} (return a DispatchPlan)"
    return ""


def _plan_data(plan) -> dict:
    def tensor(v):
        return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(v)

    return {"order": tensor(plan.order), "token_of": tensor(plan.token_of), "n_tokens": int(plan.n_tokens),
            "send_counts": [int(c) for c in plan.send_counts], "recv_counts": [int(c) for c in plan.recv_counts]}


def ep_job(moe_fn: Callable[[], nn.Module], x: torch.Tensor, probe: torch.Tensor, *, dispatch: Callable, combine: Callable,
           sizes: Sequence[int] | None = None, backward: bool = True, details: bool = False) -> dict:
    """Expert parallelism on one rank, checked against the single-process MoE by the caller.

    Every rank builds the same MoE (``moe_fn``), keeps its slice of experts, runs its shard of ``x``
    (N_total, D) through ``dispatch`` -> local experts -> ``combine`` (+ shared expert), and backpropagates
    ``L = sum(out * probe)`` (``probe`` is the same (N_total, D) tensor everywhere, so the global loss is
    the sum of the ranks' losses). Replicated parameters get their gradients all-reduced (summed).
    Between the stages every rank checks what it received (shapes, local expert ids) and all ranks
    raise together when one finds a problem, so a broken dispatch fails cleanly instead of hanging.

    Returns this rank's output rows, the gradient of its input rows, the gradients of its local
    experts (named with global expert ids), the all-reduced replicated gradients and the counts sent
    and received; with ``details`` also ``recv_expert`` and the plan's ``order``, ``token_of``, ``n_tokens``.
    """
    W, r, dev = world_size(), rank(), job_device()
    moe = moe_fn().to(dev)
    router, experts, shared = _split_moe(moe)
    E = len(experts)
    lo, hi = expert_range(E, W, r)
    local = list(experts)[lo:hi]
    sl = _shard(x.shape[0], W, r, sizes)
    xr = x[sl].to(dev).clone().requires_grad_(backward)  # (N_r, D)
    probe = probe.to(dev)
    topk_idx, topk_weight = router(xr)
    recv_x, recv_expert, plan = dispatch(xr, topk_idx, E)
    _together(_received_problem(recv_x, recv_expert, plan, len(local), x.shape[1]), "after dispatch")
    y = run_local_experts(recv_x, recv_expert, local)
    out = combine(y, plan, topk_weight)
    _together("" if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(xr.shape) else
              f"combine returned {getattr(out, 'shape', type(out).__name__)}, expected {tuple(xr.shape)} (this rank's tokens)",
              "after combine")
    if shared is not None:
        out = out + shared(xr)
    result = {"rank": r, "out": out.detach().cpu(), "send_counts": [int(c) for c in plan.send_counts],
              "recv_counts": [int(c) for c in plan.recv_counts], "topk_idx": topk_idx.detach().cpu()}
    if details:
        result.update(_plan_data(plan), recv_expert=recv_expert.detach().cpu(), topk_weight=topk_weight.detach().cpu())
    if backward:
        (out * probe[sl]).sum().backward()
        replicated = [p for m in (moe.gate, shared) if m is not None for p in m.parameters()]
        allreduce_gradients(replicated)

        def grad(t: torch.Tensor) -> torch.Tensor:
            return (t.grad if t.grad is not None else torch.zeros_like(t)).detach().cpu()

        result["x_grad"] = grad(xr)
        result["expert_grads"] = {f"experts.{lo + i}.{n}": grad(p) for i, e in enumerate(local) for n, p in e.named_parameters()}
        result["replicated_grads"] = {n: grad(p) for n, p in moe.named_parameters()
                                      if not n.startswith("experts.") and p.requires_grad}
    return result


def ep_trial(moe_cfg: dict, x: torch.Tensor, probe: torch.Tensor, *, dispatch: Callable, combine: Callable, seed: int = 0,
             bias: Sequence[float] | None = None, sizes: Sequence[int] | None = None, backward: bool = True,
             world_size: int = 2, timeout: float = 20.0, cluster: Cluster | None = None) -> dict:
    """One :func:`ep_job` with ``details`` on the kernel's cluster, for a caller that sends only data.

    The MoE is ``make_moe(seed, bias=bias, **moe_cfg)`` on every rank. Returns ``{"ranks": [per-rank
    results]}``, or ``{"error": type, "types": [per-rank exception types], "message": ...}`` when the job
    raised, hung or lost a worker (the cluster is restarted on the next run when needed). ``cluster``
    defaults to the kernel's ``get_cluster(world_size)``.
    """
    moe_fn = functools.partial(make_moe, seed, bias=None if bias is None else [float(b) for b in bias], **moe_cfg)
    try:
        cl = cluster or get_cluster(world_size)
        res = cl.run(ep_job, moe_fn, x, probe, dispatch=dispatch, combine=combine, sizes=sizes, backward=backward,
                     details=True, timeout=timeout)
    except WorkerError as e:
        return {"error": "WorkerError", "types": list(e.exc_types), "message": str(e)[-6000:]}
    except (TimeoutError, RuntimeError) as e:
        return {"error": type(e).__name__, "types": [], "message": str(e)[-6000:]}
    return {"ranks": res}


def single_process_reference(moe: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> dict:
    """The oracle for ``ep_job``: the whole batch through ``moe`` in one process, same loss, its gradients."""
    xx = x.clone().requires_grad_(True)
    out = moe(xx)
    out = out[0] if isinstance(out, tuple) else out  # course_lib's MoE returns (y, RoutingInfo)
    (out * probe).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in moe.named_parameters() if p.requires_grad}
    return {"out": out.detach(), "x_grad": xx.grad.detach(), "grads": grads}


def compare_ep(results: Sequence[dict], ref: dict) -> dict:
    """Max abs differences between gathered ``ep_job`` results and ``single_process_reference``."""
    out = torch.cat([r["out"] for r in results])
    err = {"out": float((out - ref["out"]).abs().max()) if out.numel() else 0.0}
    if "x_grad" in results[0]:
        xg = torch.cat([r["x_grad"] for r in results])
        err["x_grad"] = float((xg - ref["x_grad"]).abs().max()) if xg.numel() else 0.0
        e = 0.0
        for res in results:
            for n, g in res["expert_grads"].items():
                e = max(e, float((g - ref["grads"][n]).abs().max()))
        err["expert_grads"] = e
        e = 0.0
        for res in results:
            for n, g in res["replicated_grads"].items():
                e = max(e, float((g - ref["grads"][n]).abs().max()))
        err["replicated_grads"] = e
    return err


