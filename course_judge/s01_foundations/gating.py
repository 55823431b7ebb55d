"""Exercise 1.3: softmax / sigmoid top-k gating, expert load, MaxVio."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_float, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_3_gating"
POINTS = 3
ANSWERS = ("ex_01_3_gating",)
SUMMARY = "chosen experts against sorting, softmax weights not renormalised, sigmoid weights renormalised, int64 indices, loads, MaxVio"
REFERENCE = ("course_lib.deepseek.moe", "course_lib.deepseek.routing")


def _gate(f, logits, k, mode):
    w, i = expect_tuple(f(logits, k, mode), 2, f"topk_gating(logits, {k}, {mode!r})")
    return expect_tensor(w, "weights"), expect_tensor(i, "indices")


def judge(k, t):
    gate, load_fn, maxvio = k.g.topk_gating, k.g.expert_load, k.g.max_violation
    with t.part("visible checks: a 4-expert example in both modes, a load count, balanced MaxVio", 1):
        logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
        w, i = _gate(gate, logits, 2, "softmax")
        expect_tensor(w, "weights", shape=(1, 2))
        assert_true(i.tolist() == [[0, 2]], f"expected experts [0, 2], got {i.tolist()}", hint="topk of the scores, largest first")
        expect_close(w, torch.softmax(logits, -1)[:, [0, 2]], atol=1e-6, name="softmax weights",
                     mistakes={"the softmax weights are renormalised over the chosen experts: softmax gating keeps them as they are":
                               torch.softmax(logits[:, [0, 2]], -1)})
        w, _ = _gate(gate, logits, 2, "sigmoid")
        expect_close(w.sum(-1), torch.ones(1), atol=1e-6, name="sigmoid weights sum", hint="renormalise the chosen sigmoid scores")
        got = load_fn(torch.tensor([[0, 2], [2, 3]]), 5)
        assert_true(isinstance(got, torch.Tensor) and got.tolist() == [1, 0, 2, 1, 0],
                    f"expert_load([[0, 2], [2, 3]], 5) = {got.tolist() if isinstance(got, torch.Tensor) else got}, "
                    "expected [1, 0, 2, 1, 0]",
                    hint="count every (token, slot) pair; experts nobody chose still get a 0 (minlength)")
        assert_true(abs(expect_float(maxvio(torch.tensor([2, 2, 2, 2])), "max_violation([2, 2, 2, 2])")) < 1e-12,
                    "MaxVio of a balanced load is 0")

    g = torch.Generator().manual_seed(3)
    shapes = [(1, 2, 1), (17, 8, 2), (64, 32, 6)]
    data = [(torch.randn(T, N, generator=g, dtype=torch.float64) * 2, k_) for (T, N, k_) in shapes]
    with t.part("softmax gating: the top-k experts and their unnormalised probabilities", 0.5):
        for lg, k_ in data:
            p = torch.softmax(lg, -1)
            order = torch.argsort(p, dim=-1, descending=True)[:, :k_]
            w, i = _gate(gate, lg, k_, "softmax")
            assert_true(torch.equal(i.long(), order), f"softmax gating chose the wrong experts (T={lg.shape[0]}, N={lg.shape[1]}, k={k_})",
                        hint="the k largest scores per token, largest first")
            ws = torch.gather(p, 1, order)
            expect_close(w, ws, atol=1e-12, name="softmax gating weights",
                         mistakes={"the softmax weights are renormalised over the chosen experts: softmax gating keeps them as they are":
                                   ws / ws.sum(-1, keepdim=True),
                                   "the weights are the raw logits: softmax gating takes softmax probabilities":
                                   torch.gather(lg, 1, order)},
                         hint="softmax over ALL experts first, then keep the top-k probabilities without renormalising")
    with t.part("sigmoid gating: same experts, chosen scores divided by their sum; int64 indices", 0.5):
        for lg, k_ in data:
            s = torch.sigmoid(lg)
            order = torch.argsort(s, dim=-1, descending=True)[:, :k_]
            w, i = _gate(gate, lg, k_, "sigmoid")
            assert_true(i.dtype == torch.int64, f"indices should be int64, got {i.dtype}")
            assert_true(torch.equal(i, order), "sigmoid gating chose different experts than sorting the scores")
            ws = torch.gather(s, 1, order)
            expect_close(w, ws / ws.sum(-1, keepdim=True), atol=1e-12, name="sigmoid gating weights",
                         mistakes={"the sigmoid scores are not renormalised: divide the chosen scores by their sum": ws,
                                   "a softmax over the chosen logits: sigmoid gating divides the chosen sigmoid scores by their sum":
                                   torch.softmax(torch.gather(lg, 1, order), -1),
                                   "a softmax of the chosen sigmoid scores: divide them by their sum instead": torch.softmax(ws, -1)},
                         hint="sigmoid scores of the chosen experts divided by their sum (not a softmax)")
    with t.part("expert_load counts every (token, slot), zeros included", 0.5):
        for lg, k_ in data:
            idx = torch.argsort(lg, dim=-1, descending=True)[:, :k_]
            N = lg.shape[1] + 3  # experts nobody chose
            want = torch.tensor([int((idx == e).sum()) for e in range(N)])
            got = expect_tensor(load_fn(idx, N), f"expert_load(idx, {N})")
            assert_true(tuple(got.shape) == (N,) and torch.equal(got.to(torch.int64), want),
                        f"expert_load: got {got.tolist()}, expected {want.tolist()}",
                        hint="count every (token, slot) pair; experts nobody chose still get a 0 (minlength)")
    with t.part("MaxVio = max load / mean load - 1", 0.5):
        for load, want in (([4, 0, 0, 0], 3.0), ([3, 1], 0.5), ([5, 5, 2], 5 / 4 - 1)):
            got = expect_float(maxvio(torch.tensor(load)), f"max_violation({load})")
            mean = sum(load) / len(load)
            over_min = abs(got - (max(load) / max(min(load), 1) - 1)) < 1e-12
            hint = ("max load divided by the MEAN load, minus 1 (not divided by the min load)" if over_min
                    else "subtract 1: a balanced load has MaxVio 0" if abs(got - max(load) / mean) < 1e-12
                    else "max load divided by the MEAN load, minus 1")
            assert_true(abs(got - want) < 1e-12, f"MaxVio of {load}: got {got}, expected {want}", hint=hint)


MUTANTS = [
    Mutant("softmax weights renormalised", 'if mode == "sigmoid":\n        weights = weights / weights.sum(-1, keepdim=True)',
           "weights = weights / weights.sum(-1, keepdim=True)", expect="renormalised over the chosen"),
    Mutant("sigmoid weights not renormalised", "        weights = weights / weights.sum(-1, keepdim=True)\n", "        pass\n",
           expect="not renormalised"),
    Mutant("sigmoid weights by a softmax", "weights = weights / weights.sum(-1, keepdim=True)", "weights = torch.softmax(weights, -1)",
           expect="softmax of the chosen sigmoid scores"),
    Mutant("raw logits as weights", "scores = torch.softmax(logits, dim=-1)", "scores = logits", expect="raw logits"),
    Mutant("load without minlength", "torch.bincount(idx.reshape(-1), minlength=n_experts)", "torch.bincount(idx.reshape(-1))",
           expect="minlength"),
    Mutant("MaxVio without -1", "return float(load.max() / load.mean() - 1)", "return float(load.max() / load.mean())",
           expect="subtract 1"),
    Mutant("MaxVio over the min", "return float(load.max() / load.mean() - 1)", "return float(load.max() / load.min().clamp_min(1) - 1)",
           expect="not divided by the min"),
    Mutant("int32 indices", "return weights, idx\n", "return weights, idx.int()\n", expect="int64"),
    Mutant("smallest experts", "weights, idx = scores.topk(k, dim=-1)", "weights, idx = scores.topk(k, dim=-1, largest=False)",
           expect="wrong experts"),
]

ALTERNATIVES = [
    Alternative("sort instead of topk; one-hot load", source='''
def topk_gating(logits, k, mode="softmax"):
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(mode)
    scores = logits.softmax(-1) if mode == "softmax" else logits.sigmoid()
    weights, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    weights, idx = weights[:, :k], idx[:, :k]
    if mode == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def expert_load(idx, n_experts):
    return F.one_hot(idx.reshape(-1), n_experts).sum(0)


def max_violation(load):
    load = load.to(torch.float64)
    return float(load.max()) / float(load.mean()) - 1.0
'''),
]
