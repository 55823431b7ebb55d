"""Data and expert parallelism on real ``torch.distributed`` process groups.

The same code runs in three places:

- from a notebook kernel or pytest: ``get_cluster(2)`` spawns worker processes (start method
  ``"spawn"``, so Linux and macOS behave alike) that join a gloo process group and stay up; each
  ``cluster.run(fn, ...)`` runs ``fn`` on every rank and returns the per-rank results. Start-up (a few
  seconds: every worker imports torch) is paid once per kernel;
- under ``torchrun`` on GPUs: ``torchrun --nproc-per-node 8 -m course_lib.distributed`` initialises
  NCCL from the environment and runs the same self-checks;
- in a single process (``world_size == 1``), where every collective is the identity.

Notebook-defined functions cannot be pickled through ``spawn`` (the workers cannot import the
notebook). ``Cluster.run`` therefore ships a function defined in ``__main__`` by its *source*, with
the modules, values and other notebook functions it refers to; functions from importable modules go
by reference. Keep functions you run on workers at the top level of a cell.

Expert parallelism (EP), as in GShard / DeepSeek-V3: every rank holds ``n_experts / world_size``
routed experts and its own tokens. One MoE layer is::

    route      topk_idx, topk_weight = router(x)              (N, K) each, on every rank
    dispatch   sort the N*K (token, expert) pairs by expert; count rows per destination rank;
               all_to_all the counts (so every rank knows how many rows it will receive), then
               all_to_all the token rows and their expert ids
    compute    run each local expert on the rows it received
    combine    all_to_all the results back (the splits reversed) and sum them per token,
               weighted by topk_weight; add the shared expert

The backward of an all-to-all is the all-to-all with send and receive splits swapped (``AllToAll``),
so gradients reach the expert owners and come back to the token owners. Replicated parameters (router,
shared expert, attention) are data-parallel: all-reduce their gradients (``allreduce_gradients``).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import builtins
import contextlib
import datetime
import functools
import importlib
import inspect
import io
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
    "allreduce_gradients",
    "DispatchPlan",
    "ep_dispatch",
    "ep_combine",
    "run_local_experts",
    "expert_range",
    "ExpertParallelMoE",
    "moe_reference",
    "make_moe",
    "single_process_reference",
    "compare_ep",
    "routing_traffic",
    "capacity_drop",
    "job_device",
    "dp_job",
    "ep_job",
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

_SHIPPED: dict[tuple[str, str], Callable] = {}


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


def _function_payload(fn: types.FunctionType, _stack: tuple[str, ...] = ()) -> tuple:
    if fn.__closure__:
        raise TypeError(
            f"cannot ship {fn.__name__!r} to worker processes: it is a closure (it uses variables of an "
            "enclosing function). Define it at the top level of a cell and pass those values as arguments."
        )
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise TypeError(f"cannot ship {fn.__name__!r} to worker processes: its source is not available ({e})") from e
    deps: dict[str, bytes] = {}
    for name in sorted(_names_used(source)):
        if name == fn.__name__ or name not in fn.__globals__ or name in _stack:
            continue
        value = fn.__globals__[name]
        if isinstance(value, types.ModuleType):
            deps[name] = pickle.dumps(("module", value.__name__))
            continue
        buf = io.BytesIO()
        try:
            _ShipPickler(buf, _stack + (fn.__name__,)).dump(value)
        except Exception:  # not shippable (e.g. an open file): the worker reports a NameError if it is used
            continue
        deps[name] = pickle.dumps(("value", buf.getvalue()))
    return fn.__name__, source, deps


def _rebuild_function(name: str, source: str, deps: dict[str, bytes]) -> Callable:
    key = (name, source)
    if key in _SHIPPED:
        return _SHIPPED[key]
    ns: dict[str, object] = {"__name__": "__shipped__", "__builtins__": builtins}
    for dep, blob in deps.items():
        kind, payload = pickle.loads(blob)
        ns[dep] = importlib.import_module(payload) if kind == "module" else pickle.loads(payload)
    exec(compile(source, f"<shipped {name}>", "exec"), ns)
    fn = ns[name]
    _SHIPPED[key] = fn
    return fn


class _ShipPickler(pickle.Pickler):
    """A pickler that sends functions defined in a notebook (``__main__``) by source."""

    def __init__(self, file, stack: tuple[str, ...] = ()) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._stack = stack

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and not _importable(obj):
            return _rebuild_function, _function_payload(obj, self._stack)
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


def all_to_all(x: torch.Tensor, send_counts: Sequence[int] | torch.Tensor, recv_counts: Sequence[int] | torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Exchange rows of ``x`` (S, ...) between ranks; returns (sum(recv_counts), ...). Differentiable.

    ``send_counts[j]`` consecutive rows of ``x`` go to rank j; the result holds ``recv_counts[j]`` rows
    from each rank j, in rank order. Integer tensors (e.g. expert ids) go through too, without autograd.
    When grad mode is on, every rank runs the backward exchange even if it sent or received nothing
    (otherwise the other ranks would wait for it forever).
    """
    send = [int(c) for c in send_counts]
    recv = [int(c) for c in recv_counts]
    if x.shape[0] != sum(send):
        raise ValueError(f"x has {x.shape[0]} rows but send_counts add up to {sum(send)}")
    if world_size(group) == 1:
        return x
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


def ep_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, group: dist.ProcessGroup | None = None):
    """Send each token's row to the ranks that own its chosen experts.

    ``x``: (N, D) this rank's tokens; ``topk_idx``: (N, K) global expert ids. Returns ``recv_x``
    (R, D) the rows this rank's experts must process, ``recv_expert`` (R,) their *local* expert ids,
    and a ``DispatchPlan``. Counts go first (an all-to-all of W integers) so each rank can size its
    receive buffer; then the rows and their expert ids.
    """
    W, r = world_size(group), rank(group)
    N, K = topk_idx.shape
    per = n_experts // W
    flat = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, hence by destination rank
    token_of = order // K  # (N*K,) source token of each sorted pair
    dest = flat[order] // per  # (N*K,) destination rank
    send_counts = torch.bincount(dest, minlength=W)  # (W,)
    recv_counts = torch.empty_like(send_counts)
    if W > 1:
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    else:
        recv_counts.copy_(send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    recv_x = all_to_all(x[token_of], send, recv, group)  # (R, D)
    recv_expert = all_to_all(flat[order], send, recv, group) - r * per  # (R,) local expert ids
    return recv_x, recv_expert, DispatchPlan(order, token_of, send, recv, N)


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


def ep_combine(y: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Send expert outputs ``y`` (R, D) back and sum them per token: ``out_t = sum_k w_tk E_k(x_t)``.

    Returns (N, D). The return exchange uses the dispatch splits reversed.
    """
    back = all_to_all(y, plan.recv_counts, plan.send_counts, group)  # (N*K, D) in sorted pair order
    w = topk_weight.reshape(-1)[plan.order].to(back.dtype)  # (N*K,)
    out = back.new_zeros(plan.n_tokens, back.shape[-1])  # (N, D)
    return out.index_add(0, plan.token_of, back * w[:, None])


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


def make_moe(seed: int = 0, *, dtype: torch.dtype = torch.float64, bias: Sequence[float] | None = None, **cfg) -> nn.Module:
    """A ``course_lib.deepseek.moe.MoE`` built from ``seed`` (identical on every rank), in ``dtype``.

    ``cfg`` overrides ``MoEConfig`` fields (the balance loss is off); ``bias`` sets the gate's selection
    bias, the natural knob for skewed routing (a large bias on some experts sends every token to them).
    Pass ``functools.partial(make_moe, ...)`` to ``ep_job`` so every worker builds the same layer.
    """
    from course_lib.deepseek.moe import MoE, MoEConfig

    cfg.setdefault("seq_aux_alpha", 0.0)
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**cfg)).to(dtype)
    if bias is not None:
        with torch.no_grad():
            moe.gate.bias.copy_(torch.as_tensor(bias, dtype=moe.gate.bias.dtype))
    return moe


class ExpertParallelMoE(nn.Module):
    """A DeepSeekMoE split over the ranks of ``group``: local routed experts, replicated router and shared expert.

    ``ExpertParallelMoE.from_moe(moe)`` keeps the experts ``expert_range(E, W, rank)`` of a full MoE
    (build the same MoE on every rank, e.g. from one seed). ``replicated_parameters()`` are the
    data-parallel ones whose gradients need ``allreduce_gradients``.
    """

    def __init__(self, router: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], local_experts: Sequence[nn.Module],
                 n_experts: int, shared: nn.Module | None = None, group: dist.ProcessGroup | None = None,
                 router_module: nn.Module | None = None) -> None:
        super().__init__()
        self.router = router
        self.router_module = router_module
        self.local_experts = nn.ModuleList(local_experts)
        self.shared = shared
        self.n_experts = n_experts
        self.group = group
        W = world_size(group)
        if len(local_experts) * W != n_experts:
            raise ValueError(f"{len(local_experts)} local experts x {W} ranks != {n_experts} experts")
        self.last_plan: DispatchPlan | None = None

    @classmethod
    def from_moe(cls, moe: nn.Module, group: dist.ProcessGroup | None = None) -> ExpertParallelMoE:
        router, experts, shared = _split_moe(moe)
        lo, hi = expert_range(len(experts), world_size(group), rank(group))
        return cls(router, list(experts)[lo:hi], len(experts), shared, group, router_module=moe.gate)

    def replicated_parameters(self) -> list[nn.Parameter]:
        ps: list[nn.Parameter] = []
        for m in (self.router_module, self.shared):
            if m is not None:
                ps.extend(m.parameters())
        return ps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        topk_idx, topk_weight = self.router(x)  # (N, K), (N, K)
        recv_x, recv_expert, plan = ep_dispatch(x, topk_idx, self.n_experts, self.group)
        y = run_local_experts(recv_x, recv_expert, self.local_experts)  # (R, D)
        out = ep_combine(y, plan, topk_weight, self.group)  # (N, D)
        self.last_plan = plan
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


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


def ep_job(moe_fn: Callable[[], nn.Module], x: torch.Tensor, probe: torch.Tensor, *, sizes: Sequence[int] | None = None,
           dispatch: Callable | None = None, combine: Callable | None = None, backward: bool = True) -> dict:
    """Expert parallelism on one rank, checked against the single-process MoE by the caller.

    Every rank builds the same MoE (``moe_fn``), keeps its slice of experts, runs its shard of ``x``
    (N_total, D) through dispatch -> local experts -> combine (+ shared expert), and backpropagates
    ``L = sum(out * probe)`` (``probe`` is the same (N_total, D) tensor everywhere, so the global loss is
    the sum of the ranks' losses). Replicated parameters get their gradients all-reduced (summed).
    ``dispatch``/``combine`` default to this module's; pass a learner's to test theirs.

    Returns this rank's output rows, the gradient of its input rows, the gradients of its local
    experts (named with global expert ids), the all-reduced replicated gradients and the counts sent
    and received.
    """
    W, r, dev = world_size(), rank(), job_device()
    dispatch = dispatch or ep_dispatch
    combine = combine or ep_combine
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
    y = run_local_experts(recv_x, recv_expert, local)
    out = combine(y, plan, topk_weight)
    if shared is not None:
        out = out + shared(xr)
    result = {"rank": r, "out": out.detach().cpu(), "send_counts": list(plan.send_counts), "recv_counts": list(plan.recv_counts),
              "topk_idx": topk_idx.detach().cpu()}
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


# --------------------------------------------------------------------------------------------------
# torchrun entry point: python -m torch.distributed.run --nproc-per-node 2 -m course_lib.distributed
# --------------------------------------------------------------------------------------------------


def _dp_selfcheck_model() -> nn.Module:
    from course_lib.deepseek.common import SwiGLU

    torch.manual_seed(7)
    return SwiGLU(16, 32).double()


def main(argv: list[str] | None = None) -> int:
    """Self-check under ``torchrun``: DP gradients and EP outputs/gradients equal one process's, on every rank.

    ``torchrun --standalone --nproc-per-node N -m course_lib.distributed`` uses NCCL when there is a GPU per
    local rank, gloo otherwise (``--backend`` overrides). Exits 1 on a mismatch.
    """
    ap = argparse.ArgumentParser(description="EP/DP self-check on a torchrun-launched process group")
    ap.add_argument("--backend", default=None, help="nccl when every local rank has its own GPU, else gloo")
    ns = ap.parse_args(argv)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = ns.backend or ("nccl" if torch.cuda.device_count() >= local_ranks else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < local_ranks:
        raise SystemExit(f"nccl needs one GPU per rank: {local_ranks} local ranks, {torch.cuda.device_count()} GPUs")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        W, r = world_size(), rank()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(7 * W, 16, generator=g, dtype=torch.float64)
        probe = torch.randn(7 * W, 16, generator=g, dtype=torch.float64)
        errors: dict[str, float] = {}
        # data parallel: averaged gradients of a replicated SwiGLU
        grads = dp_job(_dp_selfcheck_model, x, probe)
        model = _dp_selfcheck_model()
        (model(x) - probe).pow(2).mean().backward()
        errors["dp_grads"] = max(float((grads[n] - p.grad).abs().max()) for n, p in model.named_parameters())
        # expert parallel: balanced routing, and everything routed to rank 0's experts
        for label, bias in (("balanced", None), ("skewed", [10.0] * 4 + [0.0] * (4 * W - 4))):
            moe_fn = functools.partial(make_moe, 0, dim=16, moe_inter_dim=8, n_routed_experts=4 * W, n_activated_experts=2,
                                       n_expert_groups=W, n_limited_groups=1, bias=bias)
            res = ep_job(moe_fn, x, probe)
            gathered: list = [None] * W
            dist.all_gather_object(gathered, res)
            err = compare_ep(gathered, single_process_reference(moe_fn(), x, probe))
            errors.update({f"ep_{label}_{k}": v for k, v in err.items()})
        worst: list = [None] * W
        dist.all_gather_object(worst, max(errors.values()))
        ok = max(worst) < 1e-10
        if r == 0:
            print(f"{W} ranks ({backend}, {job_device().type}): max abs error vs one process {max(worst):.1e}")
            for k, v in errors.items():
                print(f"  {k:28s} {v:.1e}")
            print("OK" if ok else "MISMATCH")
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
