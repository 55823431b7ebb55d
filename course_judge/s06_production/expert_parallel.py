"""Exercise 6.4: expert-parallel dispatch and combine on two torch.distributed (gloo) processes.

The learner's ``ep_dispatch`` / ``ep_combine`` run on the kernel's two worker processes through the course's
given harness (``course_lib.cluster.ep_trial``: the MoE is built on every rank from a seed, the judge sends
only the tokens, the probe and the switches). What comes back is data (outputs, gradients, split sizes, the
plan); the judge compares it here with a single-process MoE and with the outputs of known mistakes, which it
computes itself by running the same layer rank by rank in one process.
"""

from __future__ import annotations

import re

import torch

from course_judge.checks import assert_true, expect_close, matches
from course_judge.local import Alternative, Mutant
from course_judge.session import LearnerError
from course_lib.cluster import _shard, _split_moe, expert_range, make_moe, single_process_reference

GRADE_ID = "test_06_4_expert_parallel"
POINTS = 8
ANSWERS = ("ex_06_4_expert_parallel",)
SUMMARY = ("outputs and gradients (router through the combine weights, tokens, experts, shared expert) against one "
           "process in float64; split sizes, local expert ids and the plan; uneven shards, a rank without tokens, every "
           "token on one rank, top-1 with an idle expert, no shared expert, 16 experts")
REFERENCE = ("course_lib.distributed",)

W = 2
TOL = 1e-12  # float64: the course's EP vs the single-process MoE differ by < 1e-15 (sums in another order)
_BASE = dict(dim=12, moe_inter_dim=6, n_routed_experts=8, n_activated_experts=3, n_expert_groups=2, n_limited_groups=2)
CASES = {  # label: (MoE switches, tokens, shard sizes, seed, gate bias, backward)
    "visible": (dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2,
                     n_limited_groups=2), 10, None, 0, None, False),
    "balanced routing": (_BASE, 14, None, 1, None, True),
    "uneven token shards": (_BASE, 11, [8, 3], 2, None, True),
    "a rank with no tokens of its own": (_BASE, 7, [7, 0], 3, None, True),
    "all tokens routed to rank 0": (dict(_BASE, n_activated_experts=2, n_limited_groups=1), 9, None, 4,
                                    [10.0] * 4 + [0.0] * 4, True),
    "top-1, all tokens on rank 1, expert 7 idle": (dict(_BASE, n_activated_experts=1, n_limited_groups=1), 10, None, 5,
                                                  [0.0] * 4 + [5.0, 5.0, 5.0, -50.0], True),
    "4 experts, no shared expert": (dict(dim=10, moe_inter_dim=4, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
                                         n_limited_groups=1, n_shared_experts=0), 9, None, 6, None, True),
    "16 experts, top-4 of 2 kept groups out of 4": (dict(dim=8, moe_inter_dim=4, n_routed_experts=16, n_activated_experts=4,
                                                         n_expert_groups=4, n_limited_groups=2), 13, [6, 7], 7, None, True),
}

_DETACHED = ("gradient does not flow through the combine weights: do not detach topk_weight (the router learns through "
             "the weights it gives each expert's output)")
_UNWEIGHTED = ("combine weights not applied: multiply each returned row by the weight of its own (token, expert) pair "
               "before summing per token")
_PAIR_ORDER = ("the combine weights are in (token, k) order while the returned rows are sorted by expert: index them with "
               "plan.order, like the rows")
_ROWS_NOT_DIFF = ("the rows travel through an exchange without autograd: send them with the given all_to_all (differentiable) "
                  "in dispatch, and the results back with it in combine")
_ERROR_HINTS = [
    (r"did not finish|timed out|TimeoutError", "every rank must call the same collectives in the same order (a rank that "
                                               "skips an all_to_all, or takes part in one the others do not, hangs them all)"),
    (r"GLOBAL expert ids", "send LOCAL expert ids: rank j's experts are numbered from 0 there (the first one it owns is 0)"),
    (r"received expert ids", "the expert ids sent with the rows must be the rows' own experts, in the rows' sorted order, "
                             "as local ids on arrival"),
    (r"recv_counts .* disagree", "exchange the counts first: recv_counts must come from dist.all_to_all_single of the "
                                 "send counts, not be computed locally"),
    (r"x has \d+ rows but send_counts", "send the results back with the dispatch splits reversed (what a rank received "
                                        "from j goes back to j)"),
    (r"one entry per rank|divide equally|split_sizes|split sizes|collective mismatch",
     "send_counts needs one entry per rank (not per expert), also for ranks that get nothing (a count of 0)"),
    (r"combine returned", "combine returns one (D,) row per token of this rank: (N, D)"),
]


# ---------------------------------------------------------------- running the learner's code


def _inputs(n: int, dim: int, seed: int, label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0 if label == "visible" else 1000 + seed)  # the visible case: the notebook's inputs
    return (torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64))


def _failure(label: str, res: dict) -> str:
    types, msg = res.get("types") or [], str(res.get("message", ""))
    if types and all(t == "NotImplementedError" for t in types):
        return "ep_dispatch / ep_combine are not implemented yet (they raised NotImplementedError)"
    blocks = re.split(r"--- rank (\d+): ", msg)
    lines: dict[str, list[str]] = {}
    for r, body in zip(blocks[1::2], blocks[2::2]):
        tail = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
        where = [ln for ln in tail if ln.startswith('File "<') and ("ep_dispatch" in ln or "ep_combine" in ln)]
        text = (tail[-1][:700] if tail else "?") + (f" ({where[-1][:120]})" if where else "")
        lines.setdefault(text, []).append(r)
    if lines:  # ranks that raised the same error (the harness and all_to_all raise together) are shown once
        text = "\n    ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(rs)}: {m}" for m, rs in lines.items())
    elif "died while running" in msg:
        what = [ln.strip() for ln in msg.splitlines() if "what():" in ln or "Received data size" in ln]
        text = msg.split(" (", 1)[0][:200] + " (gloo aborted it)" + (f": {what[0][:300]}" if what else "")
    else:
        text = msg[-500:]
    hint = next((h for pat, h in _ERROR_HINTS if re.search(pat, msg)), "read the error on each rank")
    return f"{label}: your dispatch/combine failed on the workers ({res.get('error')}):\n    {text}\n  likely cause: {hint}"


class Trials:
    """Runs each case once (lazily) through the learner's functions in the kernel's cluster."""

    def __init__(self, k):
        self.k, self.done, self.hangs = k, {}, 0

    def __call__(self, label: str) -> dict:
        if label not in self.done and self.hangs >= 2:  # each hang costs a time-out and a restart of the workers
            self.done[label] = ({"error": "not run", "types": [], "message": "not run: your dispatch/combine hung or lost a "
                                 "worker in two earlier cases (did not finish on rank(s)): every rank must call the same "
                                 "collectives in the same order"}, None, None)
        if label not in self.done:
            cfg, n, sizes, seed, bias, backward = CASES[label]
            x, probe = _inputs(n, cfg["dim"], seed, label)
            try:
                res = self.k.call_opts(self.k.lib("course_lib.cluster:ep_trial"), (cfg, x, probe),
                                       dict(dispatch=self.k.g.ep_dispatch, combine=self.k.g.ep_combine, seed=seed, bias=bias,
                                            sizes=sizes, backward=backward))
            except LearnerError as e:
                res = {"error": e.type, "types": [e.type], "message": e.message}
            if isinstance(res, dict) and res.get("error") in ("TimeoutError", "RuntimeError"):
                self.hangs += 1
            self.done[label] = (res, x, probe)
        res, x, probe = self.done[label]
        if not isinstance(res, dict) or ("ranks" not in res and "error" not in res):
            raise AssertionError(f"{label}: the harness returned something unexpected ({type(res).__name__})")
        if "error" in res:
            raise AssertionError(_failure(label, res))
        ranks = res["ranks"]
        assert_true(isinstance(ranks, list) and len(ranks) == W and all(isinstance(r, dict) for r in ranks),
                    f"{label}: expected one result per rank")
        return {"ranks": ranks, "x": x, "probe": probe}


# ---------------------------------------------------------------- single-process oracles and known mistakes


def _moe(label: str):
    cfg, _, _, seed, bias, _ = CASES[label]
    return make_moe(seed, bias=bias, **cfg)


def _simulate(label: str, x, probe, orders, mode: str) -> dict:
    """The layer rank by rank in one process, with one known mistake in combine (or in the rows' exchange)."""
    cfg, _, sizes, _, _, _ = CASES[label]
    moe = _moe(label)
    router, experts, shared = _split_moe(moe)
    xx = x.clone().requires_grad_(True)
    outs = []
    for r in range(W):
        xr = xx[_shard(x.shape[0], W, r, sizes)]  # (N_r, D)
        idx, w = router(xr)  # (N_r, K) each
        K = idx.shape[1]
        flat = idx.reshape(-1)
        order = orders[r] if orders is not None and orders[r] is not None else torch.argsort(flat, stable=True)
        token_of = order // K
        rows = xr[token_of].detach() if mode == "rows_detached" else xr[token_of]  # (N_r K, D)
        y = torch.zeros_like(rows)
        for e in flat.unique().tolist():
            m = flat[order] == e
            y = y.index_put((m.nonzero()[:, 0],), experts[e](rows[m]))
        wf = w.reshape(-1)
        ws = {"detached": wf.detach()[order], "unweighted": torch.ones_like(wf), "pair_order": wf}.get(mode, wf[order])
        out = torch.zeros_like(xr).index_add(0, token_of, y * ws[:, None].to(y.dtype))
        outs.append(out + shared(xr) if shared is not None else out)
    out = torch.cat(outs)
    (out * probe).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in moe.named_parameters()}
    return {"out": out.detach(), "x_grad": xx.grad.detach(), "grads": grads}


def _orders(ranks, x, sizes, K) -> list:
    out = []
    for r, res in enumerate(ranks):
        o = res.get("order")
        n = len(range(*_shard(x.shape[0], W, r, sizes).indices(x.shape[0]))) * K
        ok = isinstance(o, torch.Tensor) and o.dim() == 1 and not o.is_floating_point() and o.numel() == n
        out.append(o.long() if ok and torch.equal(o.long().sort().values, torch.arange(n)) else None)
    return out


# ---------------------------------------------------------------- checks


def _close(got, want, *, name: str, mistakes, hint: str) -> None:
    """expect_close at TOL; the known mistakes (judge-side simulations) are computed only when the answer differs."""
    if isinstance(got, torch.Tensor) and matches(got, want, TOL, 0.0):
        return
    expect_close(got, want, atol=TOL, name=name, mistakes=mistakes() if isinstance(got, torch.Tensor) else None, hint=hint)


def _check_structure(label: str, t: dict) -> None:
    cfg, n, sizes, _, _, _ = CASES[label]
    per, K = cfg["n_routed_experts"] // W, cfg["n_activated_experts"]
    ranks = t["ranks"]
    for r, res in enumerate(ranks):
        idx = res["topk_idx"].reshape(-1)
        want = torch.bincount(idx // per, minlength=W).tolist()
        assert_true(res["send_counts"] == want, f"{label}: rank {r} send_counts {res['send_counts']}, expected {want}",
                    hint="send_counts[j] = the number of (token, expert) pairs whose expert lives on rank j")
        got_recv = [ranks[j]["send_counts"][r] for j in range(W)]
        assert_true(res["recv_counts"] == got_recv, f"{label}: rank {r} recv_counts {res['recv_counts']} disagree with what "
                    f"the ranks sent it ({got_recv})", hint="recv_counts come from exchanging send_counts with all_to_all_single")
        n_r = len(range(*_shard(n, W, r, sizes).indices(n)))
        assert_true(res["n_tokens"] == n_r, f"{label}: rank {r} plan.n_tokens = {res['n_tokens']}, expected {n_r}")
        order, token_of = res["order"], res["token_of"]
        ok = (isinstance(order, torch.Tensor) and order.dim() == 1 and not order.is_floating_point() and order.numel() == n_r * K
              and torch.equal(order.long().sort().values, torch.arange(n_r * K)))
        assert_true(ok, f"{label}: rank {r} plan.order should be a permutation of the {n_r * K} (token, expert) pairs",
                    hint="order lists the positions in topk_idx.flatten() of the pairs, sorted by expert")
        order = order.long()
        dest = idx[order] // per
        assert_true(bool((dest[1:] >= dest[:-1]).all()), f"{label}: rank {r} plan.order does not group the pairs by "
                    "destination rank", hint="sort the pairs by expert id: rows for rank j must be consecutive, in rank order")
        assert_true(isinstance(token_of, torch.Tensor) and torch.equal(token_of.long(), order // K),
                    f"{label}: rank {r} plan.token_of is not the token of each sorted pair",
                    hint="token_of[i] is the token the i-th sorted pair came from (topk_idx.flatten() lists K pairs per token)")
    for j, res in enumerate(ranks):
        recv = res["recv_expert"].long()
        chunks = recv.split(res["recv_counts"]) if sum(res["recv_counts"]) == recv.numel() else None
        assert_true(chunks is not None, f"{label}: rank {j} received {recv.numel()} expert ids, recv_counts add up to "
                    f"{sum(res['recv_counts'])}")
        for i, src in enumerate(ranks):
            idx = src["topk_idx"].reshape(-1)[src["order"].long()]
            want = idx[idx // per == j] - j * per
            assert_true(torch.equal(chunks[i], want), f"{label}: the expert ids rank {j} received from rank {i} "
                        f"({chunks[i].tolist()[:12]}) are not the local ids of the rows it sent ({want.tolist()[:12]})",
                        hint="send each row's own expert id along with it, in the rows' sorted order, made local on arrival")


def _check_out(label: str, t: dict, ref: dict, mistakes) -> None:
    out = torch.cat([r["out"] for r in t["ranks"]])
    _close(out, ref["out"], name=f"{label}: EP output over 2 ranks vs one process",
           mistakes=lambda: {_UNWEIGHTED: mistakes("unweighted")["out"], _PAIR_ORDER: mistakes("pair_order")["out"]},
           hint="each returned row goes to token_of of its pair, weighted by that pair's topk_weight; the return "
                      "exchange reverses the dispatch splits")


def _check_grads(label: str, t: dict, ref: dict, mistakes) -> None:
    ranks = t["ranks"]
    for res in ranks:  # the router first: a detached combine weight shows here before anywhere else
        g = res["replicated_grads"].get("gate.weight")
        _close(g, ref["grads"]["gate.weight"], name=f"{label}: router gradient (gate.weight) on rank {res['rank']}",
               mistakes=lambda: {_DETACHED: mistakes("detached")["grads"]["gate.weight"]},
               hint="the router's gradient reaches it only through topk_weight in combine")
    xg = torch.cat([r["x_grad"] for r in ranks])
    _close(xg, ref["x_grad"], name=f"{label}: gradient of the input tokens",
           mistakes=lambda: {_DETACHED: mistakes("detached")["x_grad"], _ROWS_NOT_DIFF: mistakes("rows_detached")["x_grad"]},
           hint="use the given all_to_all (differentiable) for the rows, in dispatch and in combine")
    E = CASES[label][0]["n_routed_experts"]
    for res in ranks:
        lo, hi = expert_range(E, W, res["rank"])
        names = {n for n in ref["grads"] if n.startswith("experts.") and lo <= int(n.split(".")[1]) < hi}
        assert_true(set(res["expert_grads"]) == names, f"{label}: rank {res['rank']} reports gradients for "
                    f"{sorted(res['expert_grads'])[:4]}..., expected its experts {lo}..{hi - 1}")
        for n in sorted(names):
            _close(res["expert_grads"][n], ref["grads"][n], name=f"{label}: gradient of {n} on rank {res['rank']}", mistakes=dict,
                   hint="every row must reach the owner of its expert with the right LOCAL id, and its result come back")
        for n, g in res["replicated_grads"].items():
            _close(g, ref["grads"][n], name=f"{label}: all-reduced gradient of {n} on rank {res['rank']}", mistakes=dict,
                   hint="the shared expert sees every token of this rank once")


_REFS: dict = {}


def _reference(label: str, x, probe) -> dict:
    """The single-process MoE's outputs and gradients (inputs are seeded, so one per case and process)."""
    if label not in _REFS:
        _REFS[label] = single_process_reference(_moe(label), x, probe)
    return _REFS[label]


def _case(trials, label: str, what=("out", "grads", "structure")) -> None:
    t = trials(label)
    ref = _reference(label, t["x"], t["probe"])
    cache: dict = {}
    cfg, _, sizes, _, _, _ = CASES[label]

    def mistakes(mode):
        if mode not in cache:
            cache[mode] = _simulate(label, t["x"], t["probe"], _orders(t["ranks"], t["x"], sizes, cfg["n_activated_experts"]),
                                    mode)
        return cache[mode]

    if "out" in what:
        _check_out(label, t, ref, mistakes)
    if "grads" in what and CASES[label][5]:
        _check_grads(label, t, ref, mistakes)
    if "structure" in what:
        _check_structure(label, t)


def judge(k, t):
    trials = Trials(k)
    with t.part("visible checks: the forward over 2 ranks equals one process; received counts match what was sent", 1):
        tv = trials("visible")
        ref = _reference("visible", tv["x"], tv["probe"])
        _check_out("visible", tv, ref, lambda mode: _simulate("visible", tv["x"], tv["probe"], None, mode))
        for r, res in enumerate(tv["ranks"]):
            assert_true(res["recv_counts"] == [tv["ranks"][j]["send_counts"][r] for j in range(W)],
                        f"rank {r} recv_counts {res['recv_counts']} do not match what the ranks sent it",
                        hint="exchange send_counts with dist.all_to_all_single before sending rows")
    basic = ("balanced routing", "uneven token shards", "a rank with no tokens of its own")
    with t.part("split sizes, local expert ids and the plan (order, token_of, n_tokens) on three routings", 2):
        for label in basic:
            _case(trials, label, ("structure",))
    with t.part("outputs: balanced routing, uneven token shards, a rank with no tokens of its own", 1):
        for label in basic:
            _case(trials, label, ("out",))
    with t.part("gradients: router (through the combine weights), input tokens, local experts, shared expert", 2):
        for label in basic:
            _case(trials, label, ("out", "grads"))
    with t.part("skewed routing: every token to rank 0 (rank 1 receives nothing); top-1 with an idle expert", 1):
        for label in ("all tokens routed to rank 0", "top-1, all tokens on rank 1, expert 7 idle"):
            _case(trials, label)
        sk = trials("all tokens routed to rank 0")["ranks"]
        assert_true(sk[1]["recv_counts"] == [0, 0], f"skewed routing: rank 1 should receive nothing, got {sk[1]['recv_counts']}")
    with t.part("other layers: 4 experts without a shared expert; 16 experts, top-4, uneven shards", 1):
        for label in ("4 experts, no shared expert", "16 experts, top-4 of 2 kept groups out of 4"):
            _case(trials, label)


MUTANTS = [
    Mutant("combine weights detached", "w = topk_weight.reshape(-1)[plan.order].to(back.dtype)",
           "w = topk_weight.detach().reshape(-1)[plan.order].to(back.dtype)", expect="do not detach topk_weight"),
    Mutant("combine weights not applied", "return out.index_add(0, plan.token_of, back * w[:, None])",
           "return out.index_add(0, plan.token_of, back)", expect="combine weights not applied"),
    Mutant("combine weights in pair order", "w = topk_weight.reshape(-1)[plan.order].to(back.dtype)",
           "w = topk_weight.reshape(-1).to(back.dtype)", expect="index them with plan.order"),
    Mutant("global expert ids", "recv_expert = all_to_all(flat[order], send, recv, group) - r * per",
           "recv_expert = all_to_all(flat[order], send, recv, group)", expect="send LOCAL expert ids"),
    Mutant("counts not exchanged", "dist.all_to_all_single(recv_counts, send_counts, group=group)",
           "recv_counts.copy_(send_counts)", expect="exchange the counts first"),
    Mutant("combine with the dispatch splits", "all_to_all(y, plan.recv_counts, plan.send_counts, group)",
           "all_to_all(y, plan.send_counts, plan.recv_counts, group)", expect="splits reversed"),
    Mutant("rows without autograd", "recv_x = all_to_all(x[token_of], send, recv, group)  # (R, D)",
           "recv_x = x.new_empty(sum(recv), x.shape[1])\n    dist.all_to_all_single(recv_x, x[token_of].detach(), recv, send, "
           "group=group)", expect="exchange without autograd"),
    Mutant("expert ids in pair order", "recv_expert = all_to_all(flat[order], send, recv, group) - r * per",
           "recv_expert = all_to_all(flat, send, recv, group) - r * per", expect="in the rows' sorted order"),
    # (bincount without minlength is diagnosed too, but gloo aborts a worker on it: a restart would cost the suite seconds)
    Mutant("send counts per expert", "send_counts = torch.bincount(flat[order] // per, minlength=W)",
           "send_counts = torch.bincount(flat[order], minlength=n_experts)", expect="one entry per rank"),
    Mutant("not written", "    W, r = dist.get_world_size(group), dist.get_rank(group)\n    ### BEGIN SOLUTION\n",
           "    W, r = dist.get_world_size(group), dist.get_rank(group)\n    ### BEGIN SOLUTION\n    raise NotImplementedError\n",
           expect="not implemented"),
]

ALTERNATIVES = [
    Alternative("sort by destination with torch.sort, counts by comparison, scatter_add combine", source='''
def ep_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, group=None):
    """Dispatch (alternative)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    ### BEGIN SOLUTION
    N, K = topk_idx.shape
    local_n = n_experts // W
    pairs = topk_idx.flatten()
    _, order = torch.sort(pairs, stable=True)
    token_of = torch.div(order, K, rounding_mode="floor")
    owner = pairs[order] // local_n
    send_counts = (owner[:, None] == torch.arange(W)[None, :]).sum(0).to(torch.int64)
    recv_counts = torch.zeros(W, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = [int(c) for c in send_counts], [int(c) for c in recv_counts]
    rows = torch.index_select(x, 0, token_of)
    recv_x = all_to_all(rows, send, recv, group)
    ids = all_to_all(pairs[order] - owner * local_n, send, recv, group)
    return recv_x, ids, DispatchPlan(order=order, token_of=token_of, send_counts=send, recv_counts=recv, n_tokens=N)
    ### END SOLUTION


def ep_combine(y: torch.Tensor, plan: DispatchPlan, topk_weight: torch.Tensor, group=None) -> torch.Tensor:
    """Combine (alternative)."""
    ### BEGIN SOLUTION
    returned = all_to_all(y, plan.recv_counts, plan.send_counts, group)
    weights = torch.gather(topk_weight.reshape(-1), 0, plan.order).unsqueeze(1).to(returned.dtype)
    index = plan.token_of.unsqueeze(1).expand(-1, returned.shape[1])
    return torch.zeros(plan.n_tokens, returned.shape[1], dtype=returned.dtype).scatter_add(0, index, returned * weights)
    ### END SOLUTION
'''),
]
