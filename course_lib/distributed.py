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

This module is the course's reference for Exercise 6.4 (``ep_dispatch``, ``ep_combine`` and the layer
built on them, ``ExpertParallelMoE``): graded notebooks cannot import it. The harness it runs on (the
cluster, ``all_to_all``, ``DispatchPlan``, ``run_local_experts``, the jobs and oracles) lives in
:mod:`course_lib.cluster` and is re-exported here; ``ep_job`` here defaults to the reference dispatch
and combine.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from course_lib import cluster as _cluster
from course_lib.cluster import (  # noqa: F401 - re-exported: the harness lives in course_lib.cluster
    AllToAll,
    Cluster,
    DispatchPlan,
    WorkerError,
    _dumps,
    _shard,
    _split_moe,
    all_to_all,
    allreduce_gradients,
    capacity_drop,
    check_splits,
    compare_ep,
    dp_job,
    ep_trial,
    expert_range,
    get_cluster,
    job_device,
    make_moe,
    moe_reference,
    rank,
    routing_traffic,
    run,
    run_local_experts,
    shutdown_cluster,
    single_process_reference,
    world_size,
)

# The harness's names, plus the reference dispatch and combine and the layer built on them.
__all__ = [*_cluster.__all__, "ep_dispatch", "ep_combine", "ExpertParallelMoE"]


# --------------------------------------------------------------------------------------------------
# Expert parallelism: dispatch and combine (the reference of Exercise 6.4)
# --------------------------------------------------------------------------------------------------


def ep_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, group: dist.ProcessGroup | None = None):
    """Send each token's row to the ranks that own its chosen experts.

    ``x``: (N, D) this rank's tokens; ``topk_idx``: (N, K) global expert ids. Returns ``recv_x``
    (R, D) the rows this rank's experts must process, ``recv_expert`` (R,) their *local* expert ids,
    and a ``DispatchPlan``. Counts go first (an all-to-all of W integers) so each rank can size its
    receive buffer; then the rows and their expert ids.
    """
    W = world_size(group)
    n_tok, k = topk_idx.shape
    experts_per_rank = n_experts // W
    # Stable sort of the N*K (token, slot) pairs by expert id: rows for rank j become one contiguous block.
    expert_sorted, order = torch.sort(topk_idx.flatten(), stable=True)  # (N*K,) each
    owner = torch.div(expert_sorted, experts_per_rank, rounding_mode="floor")  # (N*K,) destination rank
    token_of = torch.div(order, k, rounding_mode="floor")  # (N*K,) token of each sorted pair
    counts_out = torch.zeros(W, dtype=torch.int64).scatter_add_(0, owner, torch.ones_like(owner))  # (W,)
    counts_in = counts_out.clone()
    if W > 1:  # everyone learns how many rows arrive from everyone before any row moves
        dist.all_to_all_single(counts_in, counts_out, group=group)
    send, recv = [int(c) for c in counts_out], [int(c) for c in counts_in]
    rows = all_to_all(x.index_select(0, token_of), send, recv, group)  # (R, D)
    local_ids = all_to_all(expert_sorted - owner * experts_per_rank, send, recv, group)  # (R,) made local by the sender
    return rows, local_ids, DispatchPlan(order=order, token_of=token_of, send_counts=send, recv_counts=recv, n_tokens=n_tok)


def ep_combine(y: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Send expert outputs ``y`` (R, D) back and sum them per token: ``out_t = sum_k w_tk E_k(x_t)``.

    Returns (N, D). The return exchange uses the dispatch splits reversed.
    """
    results = all_to_all(y, plan.recv_counts, plan.send_counts, group)  # (N*K, D), same order as the sorted pairs
    gate = topk_weight.flatten().index_select(0, plan.order).unsqueeze(1).to(results.dtype)  # (N*K, 1)
    dest = plan.token_of.unsqueeze(1).expand_as(results)  # (N*K, D)
    return results.new_zeros(plan.n_tokens, results.shape[1]).scatter_add(0, dest, gate * results)


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


def ep_job(moe_fn: Callable[[], nn.Module], x: torch.Tensor, probe: torch.Tensor, *, sizes: Sequence[int] | None = None,
           dispatch: Callable | None = None, combine: Callable | None = None, backward: bool = True,
           details: bool = False) -> dict:
    """:func:`course_lib.cluster.ep_job` with this module's ``ep_dispatch``/``ep_combine`` by default."""
    return _cluster.ep_job(moe_fn, x, probe, dispatch=dispatch or ep_dispatch, combine=combine or ep_combine, sizes=sizes,
                           backward=backward, details=details)


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
