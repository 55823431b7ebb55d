"""Exercise 3.4 (MaxVio is given, Section 1.3 wrote it): the auxiliary-loss-free bias update, the sequence-wise
balance loss, a capacity limit, and the MoE layer (3.3) with a capacity factor: what it keeps, drops, and reports as its load."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_float, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s03_moe._common import TINY, dispatch_variants, kept, route, set_bias
from course_judge.s03_moe.layer import layer, run, scores_of, shared_out
from course_judge.session import LearnerError
from course_lib.deepseek.routing import expert_capacity

GRADE_ID = "test_03_4_balance"
POINTS = 5
ANSWERS = ("ex_03_4_balance",)
SUMMARY = (
    "the bias update's sign, size, ties and dtype, the sequence-wise loss per "
    "sequence with normalised scores and its gradient, first-come-first-served capacity masks, and the layer with a "
    "capacity factor (kept mask, dropped tokens, info.load counted before dropping)"
)
REFERENCE = ("course_lib.deepseek.moe",)


def _fcfs(idx: torch.Tensor, cap: int, slot_major: bool = False, last: bool = False) -> torch.Tensor:
    N, K = idx.shape
    seen: dict[int, int] = {}
    out = torch.zeros(N, K, dtype=torch.bool)
    order = [(n, j) for j in range(K) for n in range(N)] if slot_major else [(n, j) for n in range(N) for j in range(K)]
    for n, j in reversed(order) if last else order:
        e = int(idx[n, j])
        out[n, j] = seen.get(e, 0) < cap
        seen[e] = seen.get(e, 0) + 1
    return out


def _seq(
    s: torch.Tensor, idx: torch.Tensor, alpha: float, *, pooled=False, normalise=True, f_scale=True, per_batch_mean=True, softmax_p=False
) -> torch.Tensor:
    if pooled:
        s, idx = s.reshape(1, -1, s.shape[-1]), idx.reshape(1, -1, idx.shape[-1])
    B, T, E = s.shape
    K = idx.shape[-1]
    sn = torch.softmax(s, -1) if softmax_p else (s / s.sum(-1, keepdim=True) if normalise else s)
    P = sn.mean(1)
    hits = torch.stack([torch.bincount(idx[b].reshape(-1), minlength=E) for b in range(B)]).to(s.dtype)
    f = hits * E / (K * T) if f_scale else hits
    per = alpha * (f * P).sum(-1)
    return per.mean() if per_batch_mean else per.sum()


def _seq_mistakes(s, idx, alpha) -> dict:
    return {
        "the loss pools the whole batch: compute it per sequence (f and P over that sequence's T tokens), then average": _seq(
            s, idx, alpha, pooled=True
        ),
        "the scores are not normalised: P_i averages s' = s / sum_j s_j (over all experts), not s": _seq(s, idx, alpha, normalise=False),
        "P uses a softmax of s: normalise by dividing by the sum over the experts, s' = s / sum_j s_j": _seq(s, idx, alpha, softmax_p=True),
        "f is the raw hit count: f_i = E / (K T) * (hits of expert i), so perfect balance gives f_i = 1": _seq(
            s, idx, alpha, f_scale=False
        ),
        "the per-sequence losses are summed: average them over the batch": _seq(s, idx, alpha, per_batch_mean=False),
        "alpha is missing: L = alpha * sum_i f_i P_i": _seq(s, idx, 1.0),
    }


def _learner_failed(e: LearnerError, what: str) -> AssertionError:
    """The learner's exception as a failed check, with a hint for integer loads."""
    if e.not_implemented:
        return AssertionError(e.describe())
    integer = "dtype" in e.message or "Long" in e.message
    hint = "integer loads: convert to floating point before dividing (load.to(torch.float64))" if integer else ""
    where = "".join(f"\n    at {w}" for w in e.where)
    return AssertionError(f"{what} raised {e.type}: {e.message[:300]}{where}" + (f"\n  likely cause: {hint}" if hint else ""))


def _result(out, what: str):
    """One result of a ``k.many`` batch: the value, or the learner's error as a failed check."""
    if isinstance(out, LearnerError):
        raise _learner_failed(out, what)
    return out


def _call(fn, what: str, *args):
    try:
        return fn(*args)
    except LearnerError as e:
        raise _learner_failed(e, what) from None


def judge(k, t):
    g = torch.Generator().manual_seed(34)
    bu, sbl, cm = k.g.bias_update, k.g.sequence_balance_loss, k.g.capacity_mask
    with t.part("visible checks: bias_update, the 2-token loss, one capacity mask", 1):
        expect_close(
            expect_tensor(_call(bu, "bias_update", torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.001), "bias_update([10, 0, 5, 5], 0.001)"),
            torch.tensor([-0.001, 0.001, 0.0, 0.0]),
            atol=1e-9,
            name="bias_update([10, 0, 5, 5], 0.001)",
            mistakes={
                "bias update sign flipped: overloaded experts must get a LOWER bias, gamma * sign(mean - load)": torch.tensor(
                    [0.001, -0.001, 0.0, 0.0]
                )
            },
        )
        s = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
        got = expect_float(_call(sbl, "sequence_balance_loss", s, torch.tensor([[[0], [0]]]), 0.1), "sequence_balance_loss(...)")
        assert_true(
            abs(got - 0.15) < 1e-6,
            f"sequence_balance_loss of the 2-token example: got {got:.6g}, expected 0.15",
            hint="f = [4, 0, 0, 0], P = [0.375, 0.375, 0.125, 0.125] -> 0.1 * 1.5",
        )
        got = expect_tensor(_call(cm, "capacity_mask", torch.tensor([[0, 1], [0, 2], [0, 1]]), 3, 2), "capacity_mask(...)")
        assert_true(
            got.tolist() == [[True, True], [True, True], [False, True]],
            f"capacity_mask: expert 0's third assignment (token 2) must be dropped with capacity 2, got {got.tolist()}",
        )

    with t.part("the bias update: sign, magnitude, ties at the mean, float32, integer loads, load untouched", 1):
        raw = [40.0, 10.0, 25.0, 25.0, 0.0, 50.0]  # mean 25
        L = kept(k, k.lib("torch:tensor"), raw)
        d = expect_tensor(_call(bu, "bias_update(load, 0.01)", L, 0.01), "bias_update(load, 0.01)")
        assert_true(k.get(L).tolist() == raw, "bias_update must not modify load", hint="no in-place operations on load")
        assert_true(
            tuple(d.shape) == (6,) and d.dtype == torch.float32,
            f"bias_update returns a (E,) float32 tensor, got {tuple(d.shape)} {d.dtype}",
            hint="compute in float32 (the bias is a float32 buffer)",
        )
        ld = torch.tensor(raw)
        expect_close(
            d,
            torch.tensor([-0.01, 0.01, 0.0, 0.0, 0.01, -0.01]),
            atol=1e-9,
            name="bias_update(load, 0.01)",
            mistakes={
                "bias update sign flipped: overloaded experts must get a LOWER bias, gamma * sign(mean - load)": 0.01 * (ld - 25.0).sign(),
                "the bias update uses the difference mean - load itself, not its sign": 0.01 * (25.0 - ld),
                "the bias update uses the relative difference, not its sign: gamma * sign(mean - load)": 0.01 * (25.0 - ld) / 25.0,
                "gamma is missing: delta = gamma * sign(mean - load)": (25.0 - ld).sign(),
            },
            hint="gamma * sign(mean_load - load_i); experts at exactly the mean get 0",
        )
        expect_close(
            expect_tensor(_call(bu, "bias_update([3, 1, 2], 0.5)", torch.tensor([3, 1, 2]), 0.5), "bias_update on integer loads"),
            torch.tensor([-0.5, 0.5, 0.0]),
            atol=1e-9,
            name="bias_update on integer loads",
            hint="convert integer loads to float32 before taking the mean",
        )

    with t.part("sequence-wise balance loss: per sequence, normalised scores, f = E/(K T) hits, alpha; its gradient", 1):
        s = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
        one = expect_float(_call(sbl, "sequence_balance_loss", s, torch.tensor([[[0], [0]]]), 0.1), "loss")
        two = expect_float(_call(sbl, "sequence_balance_loss", 2 * s, torch.tensor([[[0], [0]]]), 0.1), "loss")
        assert_true(
            abs(one - two) < 1e-9,
            f"sequence balance loss: doubling s changed the loss from {one:.4f} to {two:.4f}",
            hint="normalise s over the experts first (s' = s / sum_j s_j)",
        )
        bal = expect_float(
            _call(sbl, "sequence_balance_loss", torch.full((1, 4, 4), 0.3), torch.tensor([[[0], [1], [2], [3]]]), 0.1), "loss"
        )
        assert_true(
            abs(bal - 0.1) < 1e-6,
            f"perfect balance must give f_i = 1 and P_i = 1/E, so the loss is alpha (0.1); got {bal:.4f}",
            hint="f_i = E / (K T) * (number of tokens that chose expert i)",
        )
        a, b = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(4, 1), torch.tensor([[0.1, 0.7, 0.1, 0.1]]).repeat(4, 1)
        two_seq = (torch.stack([a, b]), torch.tensor([[[0]] * 4, [[1]] * 4]))
        got = expect_float(_call(sbl, "sequence_balance_loss", *two_seq, 0.1), "loss")
        assert_true(
            abs(got - 0.28) < 1e-6,
            f"sequence balance loss of two collapsed sequences: got {got:.4f}, expected 0.28",
            hint="pooling all tokens of the batch gives 0.16: compute the loss per sequence, then average",
        )
        for B, T, E, K in ((3, 7, 8, 2), (2, 16, 12, 3), (1, 5, 6, 4)):
            sc = torch.sigmoid(torch.randn(B, T, E, generator=g, dtype=torch.float64))
            ix = sc.topk(K, -1).indices
            want = _seq(sc, ix, 0.01)
            got = expect_tensor(_call(sbl, "sequence_balance_loss", sc, ix, 0.01), f"sequence_balance_loss (B={B}, T={T}, E={E}, K={K})")
            expect_close(
                got.reshape(()),
                want,
                atol=1e-14,
                name=f"sequence balance loss (B={B}, T={T}, E={E}, K={K})",
                mistakes=_seq_mistakes(sc, ix, 0.01),
                hint="f_i = E / (K T) * hits_i per sequence; P_i = mean over t of s'_{i,t}",
            )
            try:
                out = k.grad(sbl, sc, ix, 0.01, wrt=[0])
            except LearnerError as e:
                raise AssertionError(
                    f"no gradient flows back to the scores ({e.type}: {e.message[:160]})\n  likely cause: P must keep its "
                    "graph to the scores (no .detach(), .data or torch.no_grad())"
                ) from None
            sg = sc.clone().requires_grad_(True)
            (ref,) = torch.autograd.grad(_seq(sg, ix, 0.01), [sg])
            assert_true(out.grads[0] is not None, "no gradient flows back to the scores", hint="P must keep its graph to the scores")
            expect_close(
                out.grads[0],
                ref,
                atol=1e-14,
                name="gradient of the balance loss w.r.t. the scores",
                hint="gradients flow through P (the normalised scores) only; f counts hits",
            )

    with t.part("capacity_mask: first come, first served in token-major order (token, then slot), vectorised", 1):
        cases = [
            (N, K, E, C, torch.randint(0, E, (N, K), generator=g))
            for N, K, E, C in ((20, 2, 4, 6), (33, 3, 8, 5), (10, 4, 6, 100), (12, 2, 3, 1), (1, 1, 1, 0))
        ]
        outs = k.many([(cm, (ix, E, C), {}) for _, _, E, C, ix in cases])
        for (N, K, E, C, ix), got in zip(cases, outs):
            got = expect_tensor(_result(got, "capacity_mask"), f"capacity_mask (N={N}, K={K}, E={E}, capacity {C})")
            assert_true(
                got.dtype == torch.bool and tuple(got.shape) == (N, K),
                f"capacity_mask must return a (N, K) bool tensor, got {got.dtype} {tuple(got.shape)}",
            )
            want = _fcfs(ix, C)
            if torch.equal(got, want):
                continue
            named = {
                "first come, first served in TOKEN order: rank the flattened, token-major assignments (indices.reshape(-1)), "
                "not slot by slot": _fcfs(ix, C, slot_major=True),
                "the LAST assignments are kept: keep the first `capacity` of each expert": _fcfs(ix, C, last=True),
                "one too many kept: an expert keeps ranks 0 .. capacity - 1 (rank < capacity)": _fcfs(ix, C + 1),
                "one too few kept: an expert keeps `capacity` assignments (rank < capacity, ranks from 0)": _fcfs(ix, max(C - 1, 0)),
                "nothing is dropped: an expert keeps at most `capacity` assignments": torch.ones(N, K, dtype=torch.bool),
            }
            for what, m in named.items():
                if torch.equal(got, m) and not torch.equal(m, want):
                    raise AssertionError(
                        f"capacity_mask (N={N}, K={K}, E={E}, capacity {C}) differs from first-come-first-served\n  likely cause: {what}"
                    )
            raise AssertionError(
                f"capacity_mask (N={N}, K={K}, E={E}, capacity {C}) differs from first-come-first-served\n  likely cause: "
                "rank each assignment within its expert in token-major order; keep rank < capacity"
            )

    with t.part("the layer with a capacity factor: the kept mask, dropped assignments, info.load counted before dropping", 1):
        kw = dict(TINY, capacity_factor=1.0)
        m, cfg, ref, state = layer(k, kw, 40)
        only = torch.full((8,), -100.0, dtype=torch.float64)
        only[4:6] = 0.0  # every token is routed to experts 4 and 5, which have 3 slots each
        set_bias(k, m.gate, only)
        state = {**state, "gate.bias": only}
        x = torch.randn(12, 16, generator=g, dtype=torch.float64)
        y, info = run(m, x)
        cap = expert_capacity(12, 2, 8, 1.0)
        idx = expect_tensor(info.indices, "info.indices", shape=(12, 2)).long()
        want_kept = _fcfs(idx, cap)
        assert_true(
            info.kept is not None,
            "with capacity_factor set, info.kept must be the capacity mask (it is None)",
            hint="kept = capacity_mask(indices, E, expert_capacity(N, K, E, cfg.capacity_factor)) when cfg.capacity_factor is set",
        )
        kept_mask = expect_tensor(info.kept, "info.kept", shape=(12, 2))
        assert_true(
            torch.equal(kept_mask.bool(), want_kept),
            f"info.kept = {kept_mask.int().tolist()}: tokens 0-2 fill the 3 slots of experts 4 and 5, the rest are dropped",
            hint="kept = capacity_mask(indices, E, expert_capacity(N, K, E, capacity_factor)), N = the flattened tokens",
        )
        load = expect_tensor(info.load, "info.load", shape=(8,)).to(torch.float64)
        all_load = torch.bincount(idx.reshape(-1), minlength=8).double()
        if torch.equal(load, torch.bincount(idx[want_kept], minlength=8).double()):
            raise AssertionError(
                f"info.load = {load.tolist()} counts only the assignments kept after capacity dropping\n  likely cause: "
                "MixtureOfExperts.forward (3.3) must count every assignment, before any capacity dropping "
                "(load = expert_load(indices, E)): the bias update and MaxVio need the demand, not what fitted"
            )
        assert_true(torch.equal(load, all_load), f"info.load = {load.tolist()}, expected {all_load.tolist()} (before capacity dropping)")
        sh = shared_out(state, cfg, x)
        expect_close(
            y[3:],
            sh[3:],
            atol=1e-12,
            name="tokens 3-11 lost both experts: only the shared expert remains",
            hint="the dropped assignments must contribute nothing: pass kept to dispatch",
        )
        w, ii = route(scores_of(state, cfg, x), only, cfg)
        routed, _ = dispatch_variants(state, cfg, x, w, ii)
        expect_close(y[:3], sh[:3] + routed[:3], atol=1e-12, name="tokens 0-2 keep both experts")
        # random routing, some assignments dropped: the whole layer against the course's
        m, cfg, ref, state = layer(k, dict(TINY, capacity_factor=0.75), 41, bias_std=0.5)
        x = torch.randn(40, 16, generator=g, dtype=torch.float64)
        y, info = run(m, x)
        with torch.no_grad():
            ry, rinfo = ref(x)
        assert_true(
            info.kept is not None and torch.equal(info.kept.bool(), rinfo.kept),
            "capacity factor 0.75, 40 tokens: info.kept differs from first-come-first-served at expert_capacity(40, 2, 8, 0.75)",
        )
        assert_true(
            torch.equal(info.load.double(), rinfo.load.double()),
            f"capacity factor 0.75: info.load = {info.load.tolist()}, expected {rinfo.load.tolist()} (every assignment, "
            "before capacity dropping)",
        )
        expect_close(y, ry, atol=1e-12, name="the layer's output with capacity factor 0.75 (the course's layer on the same weights)")


_CAP_BODY = """    onehot = F.one_hot(indices.reshape(-1), n_experts)  # (N*K, E)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (N*K,) place in its expert's queue
    return (rank < capacity).view(N, K)
"""
MUTANTS = [
    Mutant(
        "bias update sign flipped",
        "gamma * torch.sign(load.mean() - load)",
        "gamma * torch.sign(load - load.mean())",
        expect="sign flipped",
    ),
    Mutant(
        "bias update by the difference", "gamma * torch.sign(load.mean() - load)", "gamma * (load.mean() - load)", expect="not its sign"
    ),
    Mutant(
        "bias update in float64",
        "    load = load.to(torch.float32)\n    return gamma",
        "    load = load.to(torch.float64)\n    return gamma",
        expect="float32",
    ),
    Mutant(
        "bias update in place",
        "    load = load.to(torch.float32)\n    return gamma * torch.sign(load.mean() - load)",
        "    load = load.to(torch.float32)\n    load -= load.mean()\n    return -gamma * torch.sign(load)",
        expect="must not modify load",
    ),
    Mutant(
        "balance loss pooled over the batch",
        "    B, T, E = scores.shape\n    K = indices.shape[-1]\n",
        "    scores, indices = scores.reshape(1, -1, scores.shape[-1]), indices.reshape(1, -1, indices.shape[-1])\n"
        "    B, T, E = scores.shape\n    K = indices.shape[-1]\n",
        expect="per sequence",
    ),
    Mutant(
        "balance loss unnormalised",
        "P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)",
        "P = scores.mean(dim=1)",
        expect="normalise s",
    ),
    Mutant("f without E / (K T)", "f = hits * E / (K * T)", "f = hits", expect="E / (K T)"),
    Mutant(
        "P detached",
        "P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)",
        "P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1).detach()",
        expect="gradient",
    ),
    Mutant(
        "capacity slot by slot",
        _CAP_BODY,
        _CAP_BODY.replace("indices.reshape(-1)", "indices.T.reshape(-1)").replace(".view(N, K)", ".view(K, N).T"),
        expect="TOKEN order",
    ),
    Mutant("capacity one too many", "return (rank < capacity).view(N, K)", "return (rank <= capacity).view(N, K)", expect="one too many"),
    Mutant(
        "load after capacity dropping (3.3)",
        "load=expert_load(indices, cfg.n_routed_experts)",
        "load=expert_load(indices if kept is None else indices[kept], cfg.n_routed_experts)",
        cell="ex_03_3_moe",
        expect="before any capacity dropping",
    ),
    Mutant(
        "capacity ignored by the layer (3.3)",
        "        if cfg.capacity_factor is not None:\n            cap =",
        "        if False:\n            cap =",
        cell="ex_03_3_moe",
        expect="info.kept must be the capacity mask",
    ),
]

ALTERNATIVES = [
    Alternative(
        "loops over sequences, argsort ranks",
        source="""
def bias_update(load, gamma):
    l = load.double()
    mean = l.mean()
    return (gamma * ((l < mean).double() - (l > mean).double())).float()


def sequence_balance_loss(scores, indices, alpha):
    B, T, E = scores.shape
    K = indices.shape[-1]
    total = scores.new_zeros(())
    for b in range(B):
        P = (scores[b] / scores[b].sum(-1, keepdim=True)).sum(0) / T
        f = torch.bincount(indices[b].reshape(-1), minlength=E).to(scores.dtype) * E / (K * T)
        total = total + alpha * torch.dot(f, P)
    return total / B


def capacity_mask(indices, n_experts, capacity):
    N, K = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel()) - starts[flat[order]]
    return (rank < capacity).view(N, K)
""",
    ),
]
