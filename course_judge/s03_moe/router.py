"""Exercise 3.2: DeepSeek-V3's router (sigmoid affinities, selection-only bias, group-limited top-k, weights)."""

from __future__ import annotations

import math

import torch

from course_judge.checks import assert_true, expect_close, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s03_moe._common import TINY, Configs, build, by_expert, group_limit, route, routing_of
from course_judge.session import LearnerError
from course_lib.deepseek.routing import MoEConfig

GRADE_ID = "test_03_2_router"
POINTS = 7
ANSWERS = ("ex_03_2_router",)
SUMMARY = (
    "sigmoid affinities in float32/float64, group scores (top-2 sums, -inf masks), unbiased renormalised weights "
    "times route_scale, the bias selecting only and getting no gradient, every token against an oracle on four "
    "configurations (V2-style softmax included); each routing pitfall named"
)
REFERENCE = ("course_lib.deepseek.moe",)

SEL_MISTAKES_V3 = {
    "the selection ignores the bias: experts are chosen by s + b (the bias exists to move the selection)": dict(select_bias=False),
    "group score as max instead of the sum of the top-2 biased scores": dict(group="max"),
    "group score as the sum of all of the group's scores instead of its top 2": dict(group="sum"),
    "the groups are ranked by the unbiased s: a group's score is the sum of its top-2 BIASED scores s + b": dict(group_bias=False),
    "dropped groups masked with 0 instead of -inf: once s + b < 0 a masked expert outranks the kept ones "
    "and the token leaves its groups": dict(fill=0.0),
    "no group limit: experts outside the n_limited_groups best groups were chosen": dict(limit=False),
    "the kept groups are the worst ones: keep the n_limited_groups groups with the LARGEST group scores": dict(best_groups=False),
}
SEL_MISTAKES_V2 = {
    "V2-style (softmax) routing scores a group by its max, not by the top-2 sum": dict(group="top2"),
    "V2-style (softmax) routing has no bias: select with the softmax affinities alone": dict(use_bias=True, group="max"),
    "no group limit: experts outside the n_limited_groups best groups were chosen": dict(limit=False),
    "the kept groups are the worst ones: keep the n_limited_groups groups with the LARGEST group scores": dict(best_groups=False),
}
W_MISTAKES_V3 = {
    "bias in weights: the combine weights use the biased scores s + b; the bias only selects, gather the unbiased s": dict(
        weight_bias=True
    ),
    "bias in weights (and not renormalised): gather the unbiased s of the chosen experts": dict(weight_bias=True, renorm=False),
    "top-k weights not renormalised: divide the chosen s by their sum, then multiply by route_scale": dict(renorm=False),
    "route_scale forgotten: the weights must sum to route_scale": dict(scale=False),
    "top-k weights not renormalised and route_scale forgotten": dict(renorm=False, scale=False),
}
W_MISTAKES_V2 = {
    "softmax path renormalised: V2-style weights are route_scale * s of the chosen experts, NOT divided by their sum": dict(renorm=True),
    "route_scale forgotten: the softmax path multiplies the chosen s by route_scale too": dict(scale=False),
}
SEL_HINT = (
    "selection = s + bias; group score = sum of its top-2 selection scores (max for softmax); keep the best groups, -inf elsewhere; top-k"
)


def _router(k, cfgs, cfg_kw: dict, g: torch.Generator, *, bias_std: float = 0.1, dtype=torch.float64, scale: float = 1.0):
    """The learner's ExpertRouter in ``dtype`` with a weight and a bias drawn here; returns (handle, cfg, W, b)."""
    cfg = MoEConfig(**cfg_kw)
    W = torch.randn(cfg.n_routed_experts, cfg.dim, generator=g, dtype=torch.float64) * scale / math.sqrt(cfg.dim)
    b = (torch.randn(cfg.n_routed_experts, generator=g) * bias_std).to(torch.float32)
    r = build(
        k,
        k.g.ExpertRouter,
        (cfgs(**cfg_kw),),
        {"weight": W, "bias": b},
        "ExpertRouter",
        dtype="double" if dtype == torch.float64 else None,
        names_hint="the router holds the parameter weight (E, dim) and the buffer bias (E,), as in the given __init__",
    )
    return r, cfg, W.to(dtype), b


def _group_limit_mistakes(choice: torch.Tensor, cc: MoEConfig) -> dict:
    """What group_limit returns under each known mistake (only those that differ from the right answer)."""
    want = group_limit(choice, cc)
    mistakes = {
        "group score as max instead of the sum of the top-2 biased scores": group_limit(choice, cc, group="max"),
        "group score as the sum of all of the group's scores instead of its top 2": group_limit(choice, cc, group="sum"),
        "V2-style (softmax) routing scores a group by its max, not by the top-2 sum": group_limit(choice, cc, group="top2"),
        "dropped groups masked with 0 instead of -inf": group_limit(choice, cc, fill=0.0),
        "the kept groups are the worst ones: keep the n_limited_groups groups with the LARGEST group scores": group_limit(
            choice, cc, best_groups=False
        ),
        "the wrong number of groups is kept: n_limited_groups groups stay candidates, the other groups are dropped": group_limit(
            choice, cc, n_keep=max(1, cc.n_expert_groups - cc.n_limited_groups)
        ),
        "nothing is masked: the experts outside the n_limited_groups best groups must be set to -inf": choice,
    }
    return {n: v for n, v in mistakes.items() if not torch.equal(v, want)}


def _with_biases(k, r, h: torch.Tensor, biases: list) -> list:
    """``r(h)`` under each bias in turn, in one round trip (the last bias stays set)."""
    calls = []
    for b in biases:
        calls += [(r.bias.copy_, (b,), {}), (r, (h,), {})]
    outs = k.many(calls, no_grad=True)
    for o in outs:
        if isinstance(o, Exception):
            raise o
    return outs[1::2]


def _scores(h: torch.Tensor, W: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    z = h.to(torch.float64) @ W.to(torch.float64).T
    return torch.sigmoid(z) if cfg.score_func == "sigmoid" else torch.softmax(z, -1)


def _affinity_mistakes(h, W, b, cfg) -> dict:
    z = h.to(torch.float64) @ W.to(torch.float64).T
    out = {
        "raw logits: the affinities are sigmoid(x W^T)": z,
        "the affinities include the bias: s = sigmoid(x W^T) is unbiased, the bias is added only to select": torch.sigmoid(z) + b.double(),
    }
    if cfg.score_func == "sigmoid":
        out["softmax instead of sigmoid: DeepSeek-V3's affinities are sigmoid(x W^T), one per expert"] = torch.softmax(z, -1)
    else:
        out["sigmoid for score_func='softmax': V2-style affinities are a softmax over the experts"] = torch.sigmoid(z)
    return out


def check_routing(w, i, s_ref, bias, cfg: MoEConfig, name: str) -> None:
    """The learner's (weights, indices) of one batch against the reference routing, each known mistake named."""
    v3 = cfg.score_func == "sigmoid"
    assert_true(i.dtype == torch.int64, f"{name}: indices must be int64, got {i.dtype}", hint="topk(...).indices is int64; keep it")
    wr, ir = route(s_ref, bias, cfg)
    ws, is_ = by_expert(w.to(torch.float64), i)
    if not torch.equal(is_, ir):
        for what, kw in (SEL_MISTAKES_V3 if v3 else SEL_MISTAKES_V2).items():
            _, im = route(s_ref, bias, cfg, **kw)
            if not torch.equal(im, ir) and torch.equal(is_, im):
                raise AssertionError(f"{name}: the chosen experts differ from DeepSeek's routing\n  likely cause: {what}")
        n = int((is_ != ir).any(-1).nonzero()[0])
        raise AssertionError(f"{name}, token {n}: chose experts {is_[n].tolist()}, expected {ir[n].tolist()}\n  likely cause: {SEL_HINT}")
    mistakes = {what: route(s_ref, bias, cfg, **kw)[0] for what, kw in (W_MISTAKES_V3 if v3 else W_MISTAKES_V2).items()}
    if v3:
        sel = s_ref.gather(1, ir)
        mistakes["a softmax over the chosen scores: divide the chosen s by their sum instead"] = torch.softmax(sel, -1) * cfg.route_scale
    expect_close(
        ws,
        wr,
        atol=1e-5 if w.dtype == torch.float32 else 1e-12,
        name=f"{name}: weights",
        mistakes=mistakes,
        hint="route_scale * s / (sum of the chosen s) for sigmoid; route_scale * s for softmax; s unbiased",
    )


def judge(k, t):
    g = torch.Generator().manual_seed(32)
    cfgs = Configs(k)
    with t.part(
        "visible checks: sigmoid affinities, weight and index shapes, int64 indices, weights sum to 2.5, group_limit on one token", 2
    ):
        r, cfg, W, b = _router(k, cfgs, TINY, g, bias_std=0.0)
        h = torch.randn(40, 16, generator=g, dtype=torch.float64)
        s = expect_tensor(r.affinities(h), "affinities s", shape=(40, 8))
        expect_close(
            s,
            _scores(h, W, cfg),
            atol=1e-12,
            name="affinities",
            mistakes=_affinity_mistakes(h, W, b, cfg),
            hint="V3 uses a sigmoid, not a softmax",
        )
        w, i, _ = routing_of(r(h), "ExpertRouter(h)", 40, 2)
        assert_true(i.dtype == torch.int64, f"indices must be int64, got {i.dtype}")
        sel = _scores(h, W, cfg).gather(1, i.long())
        expect_close(
            w.sum(-1),
            torch.full((40,), 2.5, dtype=torch.float64),
            atol=1e-12,
            name="sum of each token's weights",
            mistakes={
                "top-k weights not renormalised: divide the chosen s by their sum": 2.5 * sel.sum(-1),
                "route_scale forgotten: the weights must sum to route_scale (2.5)": torch.ones(40, dtype=torch.float64),
            },
            hint="normalise the chosen affinities to sum to 1, then multiply by route_scale",
        )
        choice = torch.tensor([[0.9, 0.0, 0.5, 0.6, 0.1, 0.2, 0.7, 0.3]], dtype=torch.float64)
        m = expect_tensor(
            r.group_limit(choice),
            "group_limit(choice)",
            shape=(1, 8),
            hint="return the (N, E) selection scores with the dropped groups' experts at -inf",
        )
        expect_close(
            m,
            group_limit(choice, cfg),
            atol=0,
            name="group_limit on one token (groups 1 and 3 have the best top-2 sums)",
            mistakes=_group_limit_mistakes(choice, cfg),
            hint="group scores: 0.9+0.0, 0.5+0.6, 0.1+0.2, 0.7+0.3; keep the 2 best groups (1 and 3), -inf elsewhere",
        )

    with t.part("affinities: sigmoid in the input's precision (float64, float32, bfloat16 -> float32), softmax for V2 style", 1):
        r, cfg, W, b = _router(k, cfgs, TINY, g, bias_std=0.3)
        h = torch.randn(64, 16, generator=g, dtype=torch.float64)
        s = expect_tensor(r.affinities(h), "affinities of a float64 input")
        assert_true(
            s.dtype == torch.float64,
            f"float64 input must give float64 affinities, got {s.dtype}",
            hint="compute in torch.promote_types(x.dtype, torch.float32)",
        )
        expect_close(s, _scores(h, W, cfg), atol=1e-12, name="sigmoid affinities", mistakes=_affinity_mistakes(h, W, b, cfg))
        r32, _, W32, b32 = _router(k, cfgs, TINY, g, dtype=torch.float32)
        for dt, atol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-6)):
            x = torch.randn(16, 16, generator=g).to(dt)
            s = expect_tensor(r32.affinities(x), f"affinities of a {dt} input")
            assert_true(
                s.dtype == torch.float32,
                f"a {dt} input with a float32 gate must give float32 affinities, got {s.dtype}",
                hint="compute in torch.promote_types(x.dtype, torch.float32): the router runs in float32 or wider",
            )
            expect_close(
                s,
                _scores(x.double(), W32.double(), cfg).float(),
                atol=atol,
                name=f"affinities of a {dt} input",
                mistakes=_affinity_mistakes(x.double(), W32, b32, cfg),
            )
        v2 = dict(
            dim=16,
            moe_inter_dim=4,
            n_routed_experts=16,
            n_activated_experts=4,
            n_expert_groups=4,
            n_limited_groups=2,
            route_scale=1.5,
            score_func="softmax",
        )
        r2, cfg2, W2, b2 = _router(k, cfgs, v2, g)
        h = torch.randn(20, 16, generator=g, dtype=torch.float64)
        expect_close(
            expect_tensor(r2.affinities(h), "softmax affinities"),
            _scores(h, W2, cfg2),
            atol=1e-12,
            name="affinities with score_func='softmax'",
            mistakes=_affinity_mistakes(h, W2, b2, cfg2),
        )

    with t.part("group_limit: the sum of each group's top-2 scores, the best groups kept, -inf elsewhere (max for softmax)", 1):
        r, cfg, _, _ = _router(k, cfgs, TINY, g)
        # top-2 sums 0.95, 1.2, 1.0, 0.8 keep groups 1 and 2; maxima 0.95, 0.6, 0.5, 0.7 would keep groups 0 and 3
        cases = [(r, cfg, torch.tensor([[0.95, 0.0, 0.6, 0.6, 0.5, 0.5, 0.7, 0.1]], dtype=torch.float64))]
        for kw, lo in (
            (dict(TINY), -1.2),
            (dict(dim=8, moe_inter_dim=4, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2), -0.6),
            (dict(dim=8, moe_inter_dim=4, n_routed_experts=12, n_activated_experts=3, n_expert_groups=3, n_limited_groups=1), -0.2),
            (
                dict(
                    dim=8,
                    moe_inter_dim=4,
                    n_routed_experts=16,
                    n_activated_experts=4,
                    n_expert_groups=4,
                    n_limited_groups=2,
                    score_func="softmax",
                ),
                0.0,
            ),
            (dict(dim=8, moe_inter_dim=4, n_routed_experts=6, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1), -0.5),
        ):
            rr = k.call_opts(k.g.ExpertRouter, (cfgs(**kw),), keep=True)  # group_limit needs no weights
            cc = MoEConfig(**kw)
            cases.append((rr, cc, torch.rand(24, cc.n_routed_experts, generator=g, dtype=torch.float64) + lo))
        outs = k.many([(rr.group_limit, (choice,), {}) for rr, _, choice in cases])
        for (_, cc, choice), out in zip(cases, outs):
            if isinstance(out, Exception):
                raise out
            N, E = choice.shape
            name = (
                f"group_limit, {cc.n_routed_experts} experts in {cc.n_expert_groups} groups, keep {cc.n_limited_groups} ({cc.score_func})"
            )
            m = expect_tensor(
                out,
                name,
                shape=(N, E),
                hint="return the (N, E) scores with the experts of dropped groups at -inf (do not remove them)",
            )
            want = group_limit(choice, cc)
            dropped = torch.isinf(want)
            if bool(dropped.any()) and bool(torch.isfinite(m[dropped]).all()) and bool((m[dropped] < -1e3).all()):
                raise AssertionError(
                    f"{name}: the dropped experts hold a large finite number\n  likely cause: masked with a finite "
                    "value instead of -inf: use float('-inf'), which no selection score can undercut"
                )
            expect_close(m, want, atol=0, name=name, mistakes=_group_limit_mistakes(choice, cc), hint=SEL_HINT)

    with t.part(
        "forward: unbiased renormalised weights times route_scale, the bias selects only, no gradient to the bias, "
        "negative biased scores stay in their groups",
        1,
    ):
        r, cfg, W, b = _router(k, cfgs, TINY, g, bias_std=0.4)
        h = torch.randn(64, 16, generator=g, dtype=torch.float64)
        w, i, s = routing_of(r(h), "ExpertRouter(h)", 64, 2)
        s_ref = _scores(h, W, cfg)
        expect_close(
            s, s_ref, atol=1e-12, name="the scores the router returns (unbiased affinities)", mistakes=_affinity_mistakes(h, W, b, cfg)
        )
        check_routing(w, i, s_ref, b, cfg, "TINY router, bias ~ N(0, 0.4)")
        neg = (torch.randn(8, generator=g) * 0.05 - 1.0).float()  # every s + b < 0
        out_neg, out_zero = _with_biases(k, r, h, [neg, torch.zeros(8)])
        w, i, _ = routing_of(out_neg, "ExpertRouter(h)", 64, 2)
        check_routing(w, i, s_ref, neg, cfg, "negative biased scores (every s + b < 0)")
        w0, i0, _ = routing_of(out_zero, "ExpertRouter(h)", 64, 2)
        busiest = int(torch.bincount(i0.reshape(-1), minlength=8).argmax())
        pushed = torch.zeros(8)
        pushed[busiest] = -10.0
        w1, i1, s1 = routing_of(_with_biases(k, r, h, [pushed])[0], "ExpertRouter(h)", 64, 2)
        assert_true(
            not bool((i1 == busiest).any()),
            "a bias of -10 on the busiest expert must push it out of every selection",
            hint="the bias is added to the scores used for selection (group scores and top-k)",
        )
        expect_close(s1, s_ref, atol=1e-12, name="affinities after a bias change (they must not depend on the bias)")
        check_routing(w1, i1, s_ref, pushed, cfg, "after a bias change")
        inf = k.info(r)
        assert_true(
            "bias" in inf.get("buffers", {}) and "bias" not in inf.get("parameters", {}),
            f"the bias must be a buffer without gradient (register_buffer), got parameters {sorted(inf.get('parameters', {}))}",
            hint="self.register_buffer('bias', torch.zeros(E, dtype=torch.float32)): balancing moves it, gradients never do",
        )
        assert_true(
            sorted(inf.get("parameters", {})) == ["weight"],
            f"the router's only parameter is weight, got {sorted(inf.get('parameters', {}))}",
        )
        # gradient: through the weights to the gate weight and the input, never through the selection
        _, ii, _ = routing_of(_with_biases(k, r, h, [b])[0], "ExpertRouter(h)", 64, 2)
        c = torch.randn(64, 8, generator=g, dtype=torch.float64)
        try:
            out = k.grad(r, h, wrt=[0], params=r, output=0, grad_out=c.gather(1, ii.long()))
        except LearnerError as e:
            raise AssertionError(
                f"no gradient flows back through the weights ({e.type}: {e.message[:160]})\n  likely cause: the "
                "weights carry no graph to the gate weight: no .detach(), .data or torch.no_grad() in forward"
            ) from None
        Wg, hg = W.clone().requires_grad_(True), h.clone().requires_grad_(True)
        wr, ir = route(torch.sigmoid(hg @ Wg.T), b, cfg)
        ref_gW, ref_gh = torch.autograd.grad((wr * c.gather(1, ir)).sum(), [Wg, hg])
        gW = out.param_grads.get("weight")
        assert_true(
            gW is not None,
            "no gradient reaches the gate weight through the combine weights",
            hint="the weights must keep their graph: no .detach(), .data or torch.no_grad() in forward",
        )
        expect_close(
            gW,
            ref_gW,
            atol=1e-10,
            name="gradient of the gate weight",
            hint="the weights are route_scale * s / sum(chosen s), differentiable in s; the bias gets no gradient",
        )
        expect_close(out.grads[0], ref_gh, atol=1e-10, name="gradient of the input")
        k.call(r.float)
        w, i, s = routing_of(r(h.float()), "a float32 router on a float32 input", 64, 2)
        assert_true(
            w.dtype == torch.float32 and s.dtype == torch.float32, f"float32 input: float32 scores and weights, got {s.dtype} / {w.dtype}"
        )

    oracle_cfgs = [
        TINY,
        dict(
            dim=12, moe_inter_dim=4, n_routed_experts=12, n_shared_experts=1, n_activated_experts=3, n_expert_groups=3, n_limited_groups=1
        ),
        dict(dim=10, moe_inter_dim=4, n_routed_experts=6, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1, route_scale=1.0),
        dict(
            dim=16,
            moe_inter_dim=4,
            n_routed_experts=16,
            n_activated_experts=4,
            n_expert_groups=4,
            n_limited_groups=2,
            route_scale=1.5,
            score_func="softmax",
        ),
    ]
    with t.part("every token against an oracle: 3 groups keep 1, one group (route_scale 1), V2-style softmax (max, no renorm)", 2):
        for c_i, kw in enumerate(oracle_cfgs):
            r, cfg, W, b = _router(k, cfgs, kw, g, bias_std=0.15, scale=2.0)
            h = torch.randn(48, cfg.dim, generator=g, dtype=torch.float64)
            w, i, s = routing_of(r(h), f"config {c_i}", 48, cfg.n_activated_experts)
            assert_true(
                s.dtype == torch.float64 and w.dtype == torch.float64,
                "float64 input must give float64 scores and weights",
                hint="compute in torch.promote_types(x.dtype, torch.float32)",
            )
            check_routing(
                w,
                i,
                _scores(h, W, cfg),
                b,
                cfg,
                f"config {c_i} ({cfg.n_routed_experts} experts, "
                f"{cfg.n_expert_groups} groups keep {cfg.n_limited_groups}, {cfg.score_func})",
            )


_SOL = "ex_03_2_router"
MUTANTS = [
    Mutant(
        "softmax instead of sigmoid",
        'if self.cfg.score_func == "sigmoid":',
        'if self.cfg.score_func != "sigmoid":',
        expect="softmax instead of sigmoid",
    ),
    Mutant(
        "bias in weights",
        "weights = scores.gather(1, indices)  # (N, K) unbiased",
        "weights = choice.gather(1, indices)",
        expect="bias in weights",
    ),
    Mutant("not renormalised", "weights = weights / weights.sum(dim=-1, keepdim=True)", "weights = weights", expect="not renormalised"),
    Mutant(
        "route_scale forgotten",
        "return weights * cfg.route_scale, indices, scores",
        "return weights, indices, scores",
        expect="route_scale forgotten",
    ),
    Mutant(
        "group score max",
        "group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)",
        "group_scores = grouped.amax(dim=-1)",
        expect="max instead of the sum of the top-2",
    ),
    Mutant("mask with 0", 'float("-inf")).reshape(N, E)', "0.0).reshape(N, E)", expect="masked with 0 instead of -inf"),
    Mutant("mask with a finite number", 'float("-inf")).reshape(N, E)', "-1e9).reshape(N, E)", expect="finite value instead of -inf"),
    Mutant(
        "worst groups kept",
        "best = group_scores.topk(cfg.n_limited_groups, dim=-1).indices",
        "best = group_scores.topk(cfg.n_limited_groups, dim=-1, largest=False).indices",
        expect="worst",
    ),
    Mutant(
        "softmax path renormalised",
        "        if v3:\n            weights = weights / weights.sum(dim=-1, keepdim=True)",
        "        weights = weights / weights.sum(dim=-1, keepdim=True)",
        expect="softmax path renormalised",
    ),
    Mutant(
        "softmax groups by top-2 sum",
        '        if cfg.score_func == "sigmoid":\n            group_scores',
        "        if True:\n            group_scores",
        expect="scores a group by its max",
    ),
    Mutant(
        "selection ignores the bias",
        "choice = scores + self.bias.to(scores.dtype) if v3 else scores",
        "choice = scores",
        expect="ignores the bias",
    ),
    Mutant(
        "groups ranked by unbiased scores",
        "indices = self.group_limit(choice).topk(",
        'indices = torch.where(torch.isinf(self.group_limit(scores)), float("-inf"), choice).topk(',
        expect="unbiased s",
    ),
    Mutant("always float32", "dtype = torch.promote_types(x.dtype, torch.float32)", "dtype = torch.float32", expect="float64"),
    Mutant(
        "weights detached",
        "weights = scores.gather(1, indices)  # (N, K) unbiased",
        "weights = scores.detach().gather(1, indices)",
        expect="gradient",
    ),
    Mutant(
        "bias as a parameter",
        'self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))',
        "self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))",
        expect="buffer",
    ),
    Mutant(
        "int32 indices",
        "return weights * cfg.route_scale, indices, scores",
        "return weights * cfg.route_scale, indices.int(), scores",
        expect="int64",
    ),
    Mutant(
        "affinities with the bias",
        "return torch.sigmoid(logits)",
        "return torch.sigmoid(logits) + self.bias.to(logits.dtype)",
        expect="include the bias",
    ),
]

ALTERNATIVES = [
    Alternative(
        "sorting, torch.where and explicit formulas",
        source="""
class ExpertRouter(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def affinities(self, x):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = torch.einsum("nd,ed->ne", x.to(dt), self.weight.to(dt))
        if self.cfg.score_func == "sigmoid":
            return 1.0 / (1.0 + torch.exp(-z))
        z = z - z.max(-1, keepdim=True).values
        return z.exp() / z.exp().sum(-1, keepdim=True)

    def group_limit(self, choice):
        G, M = self.cfg.n_expert_groups, self.cfg.n_limited_groups
        if G == 1:
            return choice
        N, E = choice.shape
        per = choice.reshape(N, G, E // G)
        srt = per.sort(dim=-1, descending=True).values
        gs = srt[..., 0] + srt[..., 1] if self.cfg.score_func == "sigmoid" else srt[..., 0]
        rank = gs.argsort(dim=-1, descending=True).argsort(dim=-1)  # (N, G) place of each group
        ok = (rank < M).unsqueeze(-1).expand_as(per)
        return torch.where(ok, per, torch.full_like(per, -math.inf)).reshape(N, E)

    def forward(self, x):
        if x.dim() != 2 or x.shape[1] != self.cfg.dim:
            raise ValueError("bad shape")
        s = self.affinities(x)
        sel = s + self.bias.to(s.dtype) if self.cfg.score_func == "sigmoid" else s
        idx = torch.argsort(self.group_limit(sel), dim=-1, descending=True)[:, : self.cfg.n_activated_experts]
        w = torch.take_along_dim(s, idx, dim=1)
        if self.cfg.score_func == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        return self.cfg.route_scale * w, idx, s
""",
    ),
]
