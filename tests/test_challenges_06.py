"""Section 6's worked challenges, taken from the source notebook's solution cells and run for real: the deduplicated
dispatch and the capacity dispatch on a 2-process gloo cluster against one process (outputs and gradients, float64),
selective recomputation against the stored step (gradients, what is recomputed, memory after the forward)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, load_nb
from course import solution_source
from torch import nn
from torch.utils.checkpoint import checkpoint

from course_lib import cluster as cdist
from course_lib.bench import MemoryTracker
from course_lib.cluster import DispatchPlan, all_to_all
from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLA, MLAConfig
from course_lib.deepseek.moe import dispatch_sorted, expert_capacity
from course_lib.distributed import ep_combine, ep_dispatch

pytestmark = pytest.mark.xdist_group("distributed")  # one 2-process cluster, next to test_distributed.py's
TOL = 1e-12


@pytest.fixture(scope="module")
def worked() -> dict:
    """The three worked solutions, defined as a notebook defines them (module __main__, the notebook's names)."""
    nb = load_nb(ROOT / "source" / "06_production" / "06_production.ipynb")
    cells = {c["metadata"]["nbgrader"]["grade_id"]: solution_source(c) for c in nb["cells"]
             if c.get("metadata", {}).get("nbgrader", {}).get("solution")}
    ns = {"__name__": "__main__", "torch": torch, "dist": dist, "nn": nn, "functools": functools, "checkpoint": checkpoint,
          "all_to_all": all_to_all, "DispatchPlan": DispatchPlan, "RMSNorm": RMSNorm, "MLA": MLA}
    for gid in ("ex_06_c1_dedup_dispatch", "ex_06_c2_ep_capacity", "ex_06_c3_selective_recompute"):
        exec(compile(cells[gid], f"<{gid}>", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def cluster():
    cl = cdist.Cluster(2, timeout=60, wait=False)
    yield cl
    cl.close()


MOE = dict(dim=12, moe_inter_dim=6, n_routed_experts=8, n_activated_experts=3, n_expert_groups=2, n_limited_groups=2)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, MOE["dim"], generator=g, dtype=torch.float64),
            torch.randn(n, MOE["dim"], generator=g, dtype=torch.float64))


@pytest.mark.distributed
@pytest.mark.parametrize("case", [dict(), dict(sizes=[20, 0]), dict(bias=[2.0] * 4 + [0.0] * 4), dict(top1=True)],
                         ids=["even", "a rank without tokens", "every token on rank 0", "top-1"])
def test_deduplicated_dispatch_is_the_plain_layer_with_one_row_per_token_and_rank(worked, cluster, case):
    kw = {**MOE, "n_activated_experts": 1} if case.get("top1") else MOE
    moe_fn = functools.partial(cdist.make_moe, 3, bias=case.get("bias"), **kw)
    x, probe = _data(20)
    res = cluster.run(cdist.ep_job, moe_fn, x, probe, dispatch=worked["ep_dispatch_dedup"],
                      combine=worked["ep_combine_dedup"], sizes=case.get("sizes"), timeout=60)
    err = cdist.compare_ep(res, cdist.single_process_reference(moe_fn(), x, probe))
    assert max(err.values()) < TOL, err
    plain = cluster.run(cdist.ep_job, moe_fn, x, probe, dispatch=ep_dispatch, combine=ep_combine, sizes=case.get("sizes"),
                        backward=False, timeout=60)
    assert torch.allclose(torch.cat([r["out"] for r in res]), torch.cat([r["out"] for r in plain]), atol=TOL, rtol=0)
    traffic = [cdist.routing_traffic(r["topk_idx"], 8, 2, r["rank"]) for r in res]
    crossed = [r["send_counts"][1 - r["rank"]] for r in res]
    assert crossed == [t["copies_remote"] for t in traffic], "rows crossing ranks must be one per (token, remote rank)"
    assert [r["send_counts"][r["rank"]] for r in res] == [int((r["topk_idx"] // 4 == r["rank"]).any(1).sum()) for r in res]


def test_the_even_case_has_tokens_with_several_experts_on_one_rank(worked):
    """Without such tokens, copies_remote == rows_remote and the dedup test above could not tell the two apart."""
    moe = cdist.make_moe(3, **MOE)
    x, _ = _data(20)
    traffic = [cdist.routing_traffic(idx, 8, 2, r) for r, idx in enumerate(moe.gate(x)[1].split(10))]
    assert all(t["copies_remote"] < t["rows_remote"] for t in traffic), traffic


@pytest.mark.distributed
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_capacity_dispatch_drops_what_dispatch_sorted_drops(worked, cluster, cf):
    """Skewed routing on uneven shards: the queues overflow on both ranks, so a capacity counted per rank
    (without the lower ranks' counts) keeps other pairs than first come first served over the whole batch."""
    bias = [1.0] * 4 + [0.0] * 4
    moe_fn = functools.partial(cdist.make_moe, 3, bias=bias, **MOE)
    x, probe = _data(24)
    C = expert_capacity(24, 3, 8, cf)
    res = cluster.run(cdist.ep_job, moe_fn, x, probe, dispatch=functools.partial(worked["ep_dispatch_capacity"], capacity=C),
                      combine=ep_combine, sizes=[15, 9], details=True, timeout=60)
    moe = moe_fn()
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        y, kept = dispatch_sorted(moe.experts, x, w, idx, C)
        y = y + moe.shared_experts(x)
    assert 0 < int((~kept).sum()), "the case must drop pairs"
    kept_ep = torch.cat([torch.zeros(r["topk_idx"].numel(), dtype=torch.bool).index_fill_(0, r["order"], True)
                         .view_as(r["topk_idx"]) for r in res])
    assert torch.equal(kept_ep, kept)
    assert sum(sum(r["send_counts"]) for r in res) == int(kept.sum()), "dropped pairs must not be sent"
    assert torch.allclose(torch.cat([r["out"] for r in res]), y, atol=TOL, rtol=0)
    ref = cdist.single_process_reference(cdist.make_moe(3, bias=bias, capacity_factor=cf, **MOE), x, probe)
    err = cdist.compare_ep(res, ref)
    assert max(err.values()) < TOL, err


class _Block(nn.Module):
    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), MLA(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.dim), SwiGLU(cfg.dim, 2 * cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


def test_selective_recomputation_recomputes_norms_and_up_projections_only(worked, monkeypatch):
    torch.manual_seed(0)
    cfg = MLAConfig(dim=32, n_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                    v_head_dim=8, max_seq_len=64)
    stored = nn.Sequential(_Block(cfg), _Block(cfg)).double()
    sel = nn.Sequential(_Block(cfg), _Block(cfg)).double()
    sel.load_state_dict(stored.state_dict())
    names = {id(m): n for n, m in sel.named_modules()}
    calls: dict[str, int] = {}

    def counting(orig, suffix: str):
        def counted(self, *args, **kwargs):
            if id(self) in names:
                key = names[id(self)] + suffix
                calls[key] = calls.get(key, 0) + 1
            return orig(self, *args, **kwargs)
        return counted

    for cls, attr in ((RMSNorm, "forward"), (nn.Linear, "forward"), (MLA, "expand")):  # count sel's calls
        monkeypatch.setattr(cls, attr, counting(getattr(cls, attr), ".expand" if attr == "expand" else ""))
    assert worked["selective_recompute"](sel) == 2 * (4 + 2)  # 4 RMSNorms, wq_b and expand per block
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    live = {}
    for label, model in (("stored", stored), ("selective", sel)):
        with MemoryTracker() as tr:
            loss = model(x).pow(2).mean()
            live[label] = tr.live
            loss.backward()
    for a, b in zip(stored.parameters(), sel.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-12, rtol=0)
    recomputed = {n for n, c in calls.items() if c == 2}  # once in the forward, once in the backward
    assert recomputed == {n for n in calls if n.endswith(("norm", ".wq_b", ".expand"))}, calls
    assert len(recomputed) == 12 and all(calls[n] == 1 for n in calls if n not in recomputed), calls
    assert live["selective"] < live["stored"], live
