"""Exercise 6.1: a test for DeepSeek-V3's router, judged by the routers it passes and the ones it catches.

The routers are built on the judge's side from plain switches (``course_lib.routers.make_router``) and called
from the kernel through stand-ins (``course_judge.drafts``): the learner's ``test_router`` runs on each, in a
shuffled order with correct routers mixed among the wrong ones.
A test earns the catching parts only while it passes every correct router (a test that always raises
catches everything).
"""

from __future__ import annotations

import torch

from course_judge import drafts
from course_judge.drafts import Drafts
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_06_1_router_test"
POINTS = 5
ANSWERS = ("ex_06_1_router_test",)
SUMMARY = ("passes the course router and four other correct routers (experts in any order, float64 inside, another "
           "rounding), catches 19 wrong ones: affinities and bias, group-limited routing, combine weights, dtypes")
REFERENCE = ()
# Routers the kernel holds for other purposes: a test that uses one of them as its oracle tests nothing itself.
FORBIDDEN_NAMES = drafts.forbidden("moe_route", "route_correct", "make_router", "_make_router")

# Correct routers: name -> switches of course_lib.routers.make_router.
CORRECT = {
    "the course's router": {},
    "experts in ascending id order, float64 inside": dict(order="ascending", compute_dtype=torch.float64),
    "experts in reverse order, route_scale folded into the division": dict(order="reversed", scale="folded"),
    "experts in a random order per token": dict(order="shuffled", seed=3),
    "random order, float64 inside, route_scale folded": dict(order="shuffled", seed=4, compute_dtype=torch.float64,
                                                              scale="folded"),
}

# Wrong routers by rule: name -> (switches, hint).
_AFFINITY = "compare the chosen experts and their weights with your own oracle built from rules 1 and 2"
_GROUPS = ("use several groups of more than two experts, keep fewer groups than there are, and a bias that changes "
           "choices and makes some selection scores negative")
_WEIGHTS = "compare each token's weights, paired with their experts (sort both by expert id), with rule 5, within a tolerance"
WRONG = {
    "affinities and selection (rules 1-2)": {
        "affinities from a softmax over the experts instead of a sigmoid": (dict(affinity="softmax"), _AFFINITY),
        "the bias is not used to choose experts": (dict(bias_on="none"), "use a bias large enough to change the choice"),
        "the bias is added to the logits instead of the affinities": (dict(bias_on="logits"), _AFFINITY),
        "the bias is subtracted": (dict(bias_scale=-1.0), "use a bias large enough to change the choice"),
    },
    "group-limited routing (rule 3)": {
        "a group's score is its best selection score instead of the sum of its two best": (dict(group_score="max"), _GROUPS),
        "a group's score is the sum of all its selection scores instead of its two best": (dict(group_score="sum"), _GROUPS),
        "groups are scored by the unbiased affinities": (dict(group_bias=False), _GROUPS),
        "groups are strided (expert e in group e mod G) instead of contiguous": (dict(group_layout="strided"), _GROUPS),
        "experts outside the kept groups are masked with 0 instead of -inf (chosen over negative selection scores)":
            (dict(mask_fill=0.0), "make some selection scores negative (a negative bias) so a 0 beats them"),
        "no group limit: every expert is eligible": (dict(group_limit=False), _GROUPS),
        "one group more than n_limited_groups stays eligible": (dict(extra_groups=1), _GROUPS),
    },
    "combine weights and the contract (rules 4-5)": {
        "the bias leaks into the combine weights": (dict(weights_from="selection"), _WEIGHTS),
        "the weights are not renormalised over the chosen experts": (dict(normalise="none"), _WEIGHTS),
        "route_scale is forgotten": (dict(scale="none"), "use a route_scale other than 1"),
        "the weights are normalised over all experts instead of the chosen ones": (dict(normalise="all"), _WEIGHTS),
        "the weights are a softmax of the chosen logits": (dict(normalise="softmax_logits"), _WEIGHTS),
        "the weights are not paired with their experts (sorted apart)": (dict(paired=False), _WEIGHTS),
        "float64 weights for float32 logits (the weights' dtype must be the logits')":
            (dict(weights_dtype=torch.float64), "check the dtype of the weights for float32 logits"),
        "int32 indices (the contract says int64)": (dict(index_dtype=torch.int32), "check the dtype of the indices"),
    },
}
VISIBLE_WRONG = ("the bias leaks into the combine weights", "the weights are not renormalised over the chosen experts")
_WRONG_FLAT = {name: spec for group in WRONG.values() for name, spec in group.items()}
_PART_POINTS = {"affinities and selection (rules 1-2)": 1, "group-limited routing (rule 3)": 1,
                "combine weights and the contract (rules 4-5)": 1}


DRAFTS = Drafts("course_lib.routers:make_router", "test_router", CORRECT, _WRONG_FLAT, noun="router")
_CAUSE = ("compare the set of experts of each token (sort by expert id first), not positions; compare weights within a "
          "tolerance (float32 routers round differently from a float64 oracle)")


def judge(k, t):
    results: dict = {}
    with t.part("visible checks: passes the course router, catches bias in the weights and weights not renormalised", 1):
        results.update(drafts.run(k, DRAFTS))
        drafts.accepts(results, ["the course's router"], DRAFTS, _CAUSE)
        drafts.catches(results, VISIBLE_WRONG, DRAFTS)
    accepted = False
    complete = len(results) == len(CORRECT) + len(_WRONG_FLAT)
    with t.part("passes correct routers written differently (experts in any order, float64 inside, other rounding)", 1):
        if not complete:
            raise AssertionError("not graded: the routers could not be run through your test")
        drafts.accepts(results, list(CORRECT), DRAFTS, _CAUSE)
        accepted = True
    for rule, wrong in WRONG.items():
        with t.part(f"catches wrong routers: {rule}", _PART_POINTS[rule]):
            if not (accepted and complete):
                raise AssertionError("not graded: your test must pass every correct router before catching wrong ones counts")
            drafts.catches(results, [n for n in wrong if n not in VISIBLE_WRONG], DRAFTS)


MUTANTS = [
    Mutant("experts compared by position", "order = torch.argsort(indices, dim=1)",
           "order = torch.arange(K).expand(N, K)", expect="rejects a correct router"),
    Mutant("weights compared exactly", "torch.allclose(got_w, want_w, atol=1e-5, rtol=1e-5)", "torch.equal(got_w, want_w)",
           expect="rejects a correct router"),
    Mutant("oracle without the bias", "sel = s + bias.double()  # (N, E)", "sel = s  # (N, E)",
           expect="rejects a correct router"),
    Mutant("no negative selection scores", "(48, 16, 6, 4, 2, 1.0, 1.0, -0.8)", "(48, 16, 6, 4, 2, 1.0, 1.0, 0.0)",
           expect="masked with 0"),
    Mutant("weights' dtype not checked",
           '            assert weights.dtype == dtype, f"case {i}: weights dtype {weights.dtype}, expected {dtype}"\n', "",
           expect="float64 weights for float32 logits"),
    Mutant("indices' dtype not checked",
           '            assert indices.dtype == torch.int64, f"case {i}: indices dtype {indices.dtype}"\n', "",
           expect="int32 indices"),
    Mutant("weights not checked",
           "            assert torch.allclose(got_w, want_w, atol=1e-5, rtol=1e-5), \\\n",
           "            assert True, \\\n", expect="route_scale is forgotten"),
    Mutant("weights sorted apart from their experts", "got_w = torch.gather(weights, 1, order).double()",
           "got_w = weights.double().sort(dim=1).values\n            want_w = want_w.sort(dim=1).values",
           expect="not paired with their experts"),
    Mutant("a single group everywhere", "for i, (N, E, K, G, M, scale, b_scale, b_shift) in enumerate(cases):",
           "for i, (N, E, K, G, M, scale, b_scale, b_shift) in enumerate([(48, 16, 4, 1, 1, 2.5, 0.5, -0.3)]):",
           expect="group"),
    Mutant("not written", "    ### BEGIN SOLUTION\n", "    ### BEGIN SOLUTION\n    raise NotImplementedError\n",
           expect="not implemented"),
]

ALTERNATIVES = [
    Alternative("a per-token loop oracle, sets of experts, own inputs", source='''
def test_router(route_fn) -> None:
    """Rules 1-5 against a loop over tokens (Python lists), in float64."""
    ### BEGIN SOLUTION
    import math

    def expected(lg, b, K, G, M, scale):
        E = len(lg)
        per = E // G
        s = [1 / (1 + math.exp(-v)) for v in lg]
        sel = [s[e] + b[e] for e in range(E)]
        gs = [sum(sorted(sel[g * per:(g + 1) * per])[-2:]) for g in range(G)]
        kept = set(sorted(range(G), key=lambda g: -gs[g])[:M])
        cand = sorted((e for e in range(E) if e // per in kept), key=lambda e: -sel[e])[:K]
        tot = sum(s[e] for e in cand)
        return {e: scale * s[e] / tot for e in cand}

    configs = [(40, 16, 4, 4, 2, 2.5, 0.6, 0.0), (40, 16, 5, 4, 2, 1.0, 0.8, -1.0), (24, 12, 2, 3, 1, 2.0, 0.4, 0.0),
               (24, 6, 3, 1, 1, 1.3, 1.5, 0.0)]
    g = torch.Generator().manual_seed(7)
    for N, E, K, G, M, scale, bs, shift in configs:
        for dtype in (torch.float64, torch.float32):
            logits = torch.randn(N, E, generator=g, dtype=torch.float64).to(dtype)
            bias = (torch.randn(E, generator=g, dtype=torch.float64) * bs + shift).to(dtype)
            w, idx = route_fn(logits, bias, top_k=K, n_groups=G, n_limited_groups=M, route_scale=scale)
            assert isinstance(w, torch.Tensor) and w.dtype == dtype and tuple(w.shape) == (N, K)
            assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and tuple(idx.shape) == (N, K)
            for t in range(N):
                want = expected(logits[t].double().tolist(), bias.double().tolist(), K, G, M, scale)
                got = {int(e): float(v) for e, v in zip(idx[t], w[t])}
                assert set(got) == set(want), (t, sorted(got), sorted(want))
                for e in want:
                    assert abs(got[e] - want[e]) <= 1e-5 * (1 + abs(want[e])), (t, e, got[e], want[e])
    ### END SOLUTION
'''),
]
