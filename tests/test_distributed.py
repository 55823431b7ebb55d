"""course_lib.distributed: real gloo process groups (2 spawned workers, one start-up for the module).

Every spawn has a timeout, so a hang fails the test instead of blocking the suite. Oracles are the
single-process ``course_lib.deepseek.moe.MoE`` (outputs and gradients, float64) and ``moe_reference``.
"""

from __future__ import annotations

import functools
import linecache
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from course_lib import distributed as D
from course_lib.deepseek.common import SwiGLU
from course_lib.deepseek.moe import route

# `make test` runs pytest-xdist with --dist loadgroup: keep this module on one xdist worker, so one
# 2-process cluster serves every test instead of one per xdist worker.
pytestmark = pytest.mark.xdist_group("distributed")
TOL = 1e-12  # float64: EP and single process agree to ~1e-15 at most (sums in a different order)


@pytest.fixture(scope="module")
def cluster():
    cl = D.Cluster(2, timeout=60, wait=False)  # background start: the first run waits for the workers
    yield cl
    cl.close()


def _moe_fn(**kw):
    base = dict(dim=12, moe_inter_dim=6, n_routed_experts=8, n_activated_experts=3, n_expert_groups=2, n_limited_groups=2)
    base.update(kw)
    return functools.partial(D.make_moe, 3, **base)


def _run_ep(cluster, moe_fn, n=14, sizes=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, moe_fn.keywords["dim"], generator=g, dtype=torch.float64)
    probe = torch.randn(x.shape, generator=g, dtype=torch.float64)
    res = cluster.run(D.ep_job, moe_fn, x, probe, sizes=sizes, timeout=60, **kw)
    ref = D.single_process_reference(moe_fn(), x, probe)
    return res, ref, D.compare_ep(res, ref)


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.distributed
def test_cluster_runs_on_every_rank(cluster):
    assert cluster.run(D.rank) == [0, 1]
    assert cluster.run(D.world_size) == [2, 2]


def _main_function(src: str, name: str, extra: dict) -> object:
    """Define ``name`` from ``src`` as if typed in a notebook (module ``__main__``, source in linecache)."""
    filename = f"<notebook-cell-{name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    ns = {"__name__": "__main__", **extra}
    exec(compile(src, filename, "exec"), ns)
    return ns[name]


@pytest.mark.distributed
def test_notebook_functions_travel_by_source(cluster):
    """A function from __main__ (a notebook) is shipped with the helpers, modules and values it uses."""
    src = (
        "def helper(v):\n"
        "    return v * SCALE\n"
        "def job(x):\n"
        "    y = helper(x) + dist.get_rank()\n"
        "    dist.all_reduce(y)\n"
        "    return y\n"
    )
    job = _main_function(src, "job", {"SCALE": 3.0, "dist": dist, "torch": torch})
    assert job.__module__ == "__main__"
    out = cluster.run(job, torch.ones(2))
    for y in out:
        torch.testing.assert_close(y, torch.full((2,), 7.0))  # (3 + 0) + (3 + 1)


@pytest.mark.distributed
def test_worker_error_keeps_cluster_when_every_rank_fails_cleanly(cluster):
    stub = _main_function("def stub():\n    raise NotImplementedError('write me')\n", "stub", {})
    with pytest.raises(D.WorkerError) as e:
        cluster.run(stub)
    assert e.value.exc_types == ["NotImplementedError", "NotImplementedError"]
    assert "write me" in str(e.value)
    assert cluster.alive
    assert cluster.run(D.rank) == [0, 1]


def _mismatched_collective() -> None:
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: a hang


@pytest.mark.distributed
def test_hang_times_out_and_cluster_restarts(cluster):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="disagree on a collective"):
        cluster.run(_mismatched_collective, timeout=3)
    assert time.monotonic() - t0 < 20
    assert not cluster.alive
    assert cluster.run(D.rank) == [0, 1]  # restarted on demand


def _one_rank_fails() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad expert id on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 forever


@pytest.mark.distributed
def test_error_on_one_rank_is_reported_quickly_not_as_a_hang(cluster):
    t0 = time.monotonic()
    with pytest.raises(D.WorkerError, match="waited for them in a collective") as e:
        cluster.run(_one_rank_fails, timeout=60)
    assert time.monotonic() - t0 < cluster.error_grace + 10
    assert "bad expert id on rank 1" in str(e.value)
    assert cluster.run(D.rank) == [0, 1]


@pytest.mark.distributed
def test_functions_without_source_travel_as_code_objects(cluster):
    """Code run by exec() has no source to read (no linecache entry): it travels as its code object."""
    ns = {"__name__": "__main__", "dist": dist, "OFFSET": 2.0}
    exec(compile("def job(x, scale=3.0):\n    return x * scale + OFFSET + dist.get_rank()\n", "<no source>", "exec"), ns)
    out = cluster.run(ns["job"], torch.ones(2))
    for r, y in enumerate(out):
        torch.testing.assert_close(y, torch.full((2,), 5.0 + r))


def _wrong_recv_counts() -> list:
    send = [1, 2] if dist.get_rank() == 0 else [3, 1]
    recv = [1, 3] if dist.get_rank() == 0 else [1, 1]  # rank 1 should expect [2, 1]
    return D.all_to_all(torch.zeros(sum(send), 2), send, recv).shape[0]


@pytest.mark.distributed
def test_inconsistent_splits_fail_on_every_rank_and_keep_the_cluster(cluster):
    with pytest.raises(D.WorkerError, match="disagree") as e:
        cluster.run(_wrong_recv_counts, timeout=30)
    assert e.value.exc_types == ["ValueError", "ValueError"]  # both ranks, cleanly: no hang, no dead worker
    assert cluster.alive and cluster.run(D.rank) == [0, 1]


@pytest.mark.distributed
def test_ep_trial_returns_data_or_the_error(cluster):
    cfg = dict(dim=12, moe_inter_dim=6, n_routed_experts=8, n_activated_experts=3, n_expert_groups=2, n_limited_groups=2)
    g = torch.Generator().manual_seed(0)
    x, probe = torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randn(9, 12, generator=g, dtype=torch.float64)
    res = D.ep_trial(cfg, x, probe, dispatch=D.ep_dispatch, combine=D.ep_combine, seed=3, sizes=[5, 4], cluster=cluster)
    ref = D.single_process_reference(D.make_moe(3, **cfg), x, probe)
    assert max(D.compare_ep(res["ranks"], ref).values()) < TOL
    for r, out in enumerate(res["ranks"]):  # the plan travels as data
        assert torch.equal(out["token_of"], out["order"] // 3) and out["n_tokens"] == [5, 4][r]
    stub = _main_function("def stub(*args, **kwargs):\n    raise NotImplementedError\n", "stub", {})
    bad = D.ep_trial(cfg, x, probe, dispatch=stub, combine=D.ep_combine, cluster=cluster)
    assert bad["error"] == "WorkerError" and bad["types"] == ["NotImplementedError"] * 2
    assert cluster.alive


# ---------------------------------------------------------------------------------------------- DP


def _mlp():
    torch.manual_seed(7)
    return SwiGLU(6, 10).double()


@pytest.mark.distributed
def test_data_parallel_gradients_equal_single_process(cluster):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    target = torch.randn(10, 6, generator=g, dtype=torch.float64)
    grads = cluster.run(D.dp_job, _mlp, x, target)
    model = _mlp()
    (model(x) - target).pow(2).mean().backward()
    for r in range(2):
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[r][name], p.grad, atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- EP


@pytest.mark.distributed
def test_ep_equals_single_process_moe(cluster):
    res, ref, err = _run_ep(cluster, _moe_fn())
    assert max(err.values()) < TOL, err
    # every routed expert's gradient came back to its owner: names cover all 8 experts exactly once
    names = sorted({n.split(".")[1] for r in res for n in r["expert_grads"]}, key=int)
    assert names == [str(i) for i in range(8)]


@pytest.mark.distributed
def test_ep_split_sizes_are_exchanged_consistently(cluster):
    res, _, _ = _run_ep(cluster, _moe_fn(), n=11, sizes=[8, 3])
    for r, out in enumerate(res):
        dest = out["topk_idx"].reshape(-1) // 4  # 4 experts per rank
        assert out["send_counts"] == torch.bincount(dest, minlength=2).tolist()
        for j in range(2):
            assert out["recv_counts"][j] == res[j]["send_counts"][r]


@pytest.mark.distributed
def test_ep_skewed_routing_with_idle_rank_and_experts(cluster):
    """Bias +10 on experts 0-3 (rank 0), groups = ranks, one kept group: rank 1 receives nothing."""
    bias = [10.0] * 4 + [0.0] * 4
    res, ref, err = _run_ep(cluster, _moe_fn(n_limited_groups=1, n_activated_experts=2, bias=bias), n=9)
    assert max(err.values()) < TOL, err
    assert all(out["send_counts"][1] == 0 for out in res)
    assert res[1]["recv_counts"] == [0, 0]
    for name, g in res[1]["expert_grads"].items():
        assert torch.count_nonzero(g) == 0, f"{name} received no tokens but has a gradient"
        assert torch.count_nonzero(ref["grads"][name]) == 0


@pytest.mark.distributed
def test_ep_rank_without_tokens(cluster):
    """One rank holds no tokens at all; it still serves its experts and joins every collective."""
    res, ref, err = _run_ep(cluster, _moe_fn(), n=7, sizes=[7, 0])
    assert max(err.values()) < TOL, err
    assert res[1]["out"].shape == (0, 12)
    assert sum(res[1]["recv_counts"]) > 0


@pytest.mark.distributed
def test_ep_forward_only_under_no_grad(cluster):
    res, ref, err = _run_ep(cluster, _moe_fn(), backward=False)
    assert err["out"] < TOL


def test_ep_single_process_is_identity_exchange():
    """Without a process group, dispatch/combine reduce to a local sort and un-sort."""
    assert not dist.is_initialized()
    moe = _moe_fn()()
    torch.manual_seed(0)
    x = torch.randn(10, 12, dtype=torch.float64)
    ep = D.ExpertParallelMoE.from_moe(moe)
    torch.testing.assert_close(ep(x), moe(x)[0], atol=TOL, rtol=0)
    assert ep.last_plan.send_counts == [30] and ep.last_plan.recv_counts == [30]


def test_moe_reference_matches_course_moe():
    moe = _moe_fn()()
    x = torch.randn(6, 12, dtype=torch.float64)
    w, idx, _ = moe.gate(x)
    torch.testing.assert_close(D.moe_reference(x, idx, w, moe.experts, moe.shared_experts), moe(x)[0], atol=TOL, rtol=0)


def test_shipping_rejects_closures_with_a_clear_message():
    k = 3

    def inner(x):
        return x * k

    inner.__module__ = "__main__"
    with pytest.raises(TypeError, match="closure"):
        D._dumps(inner)


# ---------------------------------------------------------------------------------------------- routing statistics


def test_routing_traffic_hand_example():
    # 4 experts on 2 ranks (0,1 | 2,3); tokens on rank 0
    idx = torch.tensor([[0, 1], [0, 2], [2, 3], [3, 1]])
    t = D.routing_traffic(idx, 4, 2, 0)
    assert t["rows_remote"] == 4  # pairs (1:2), (2:2), (2:3), (3:3)
    assert t["copies_remote"] == 3  # tokens 1, 2, 3 each visit rank 1 once
    assert t["max_ranks_per_token"] == 2
    assert t["mean_ranks_per_token"] == pytest.approx(6 / 4)  # 1 + 2 + 1 + 2 ranks


def test_group_limited_routing_bounds_nodes_per_token():
    """V3 routing with groups = nodes: at most n_limited_groups nodes per token; without the limit, more."""
    torch.manual_seed(0)
    scores = torch.rand(512, 256)
    bias = 0.05 * torch.randn(256)
    _, idx_lim = route(scores, bias, top_k=8, n_groups=8, n_limited_groups=4, route_scale=2.5)
    _, idx_free = route(scores, bias, top_k=8, n_groups=1, n_limited_groups=1, route_scale=2.5)
    lim = D.routing_traffic(idx_lim, 256, 8, 0)
    free = D.routing_traffic(idx_free, 256, 8, 0)
    assert lim["max_ranks_per_token"] <= 4
    assert free["max_ranks_per_token"] > 4
    assert lim["copies_remote_per_token"] < free["copies_remote_per_token"]
    # rows (one per token-expert pair) do not shrink: only deduplicated copies benefit
    assert lim["rows_remote"] == pytest.approx(free["rows_remote"], rel=0.2)


def test_capacity_drop_counts_overflow():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])  # expert 0 gets 4 of 8 pairs
    r = D.capacity_drop(idx, 4, 1.0)
    assert r["capacity"] == 2 and r["dropped"] == 2 and r["drop_fraction"] == 0.25
    dev = D.capacity_drop(idx, 4, 1.0, world=2)  # rank 0 (experts 0, 1) holds 6 pairs, capacity 4
    assert dev["capacity"] == 4 and dev["dropped"] == 2
    assert D.capacity_drop(idx, 4, 2.0)["dropped"] == 0


def test_capacity_drop_matches_moe_dispatch_kept_mask():
    """Per-expert capacity counts agree with course_lib.deepseek.moe's first-come-first-served dropping."""
    from course_lib.deepseek.moe import dispatch_sorted, expert_capacity

    torch.manual_seed(0)
    idx = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]).expand(40, 8), 2)  # (40, 2) skewed
    cap = expert_capacity(40, 2, 8, 1.25)
    experts = [torch.nn.Identity()] * 8
    _, kept = dispatch_sorted(experts, torch.randn(40, 3), torch.ones(40, 2), idx, capacity=cap)
    r = D.capacity_drop(idx, 8, 1.25)
    assert r["capacity"] == cap
    assert r["dropped"] == int((~kept).sum())


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.distributed
def test_same_module_runs_under_torchrun_with_three_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "course_lib.distributed",
           "--backend", "gloo"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 ranks (gloo, cpu)" in proc.stdout and "OK" in proc.stdout, proc.stdout
