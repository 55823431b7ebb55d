"""Exercise 3.3: the MoE layer (shared + routed experts) with a dispatch grouped by expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_judge.checks import assert_true, expect_close, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s03_moe._common import (
    EXPERT_DRAFTS,
    SWIGLU_MISTAKES,
    TINY,
    build,
    dispatch_variants,
    expert_outputs,
    expert_weights,
    load_state,
    matmul_flops,
    no_token_loop,
    reference_moe,
    remote_cfg,
    route,
    set_bias,
    swiglu,
    swiglu_mistakes,
)
from course_judge.s03_moe.router import check_routing
from course_judge.session import LearnerError
from course_lib import wire
from course_lib.deepseek.routing import MoEConfig

GRADE_ID = "test_03_3_moe"
POINTS = 7
ANSWERS = ("ex_03_3_moe",)
SUMMARY = (
    "the experts' SwiGLU and the fused shared expert, the output against the course's layer on three configurations "
    "and both input shapes with every dispatch mistake named, info.load, no loop over tokens and no dense compute "
    "(profiled), experts without tokens, gradients to the gate and the used experts only, the kept mask"
)
REFERENCE = ("course_lib.deepseek.moe",)
FORBIDDEN_NAMES = EXPERT_DRAFTS  # the drafts of 3.1's test hand over a correct expert

CFG_A = dict(dim=12, moe_inter_dim=6, n_routed_experts=12, n_shared_experts=2, n_activated_experts=3, n_expert_groups=3, n_limited_groups=1)
CFG_C = dict(
    dim=10,
    moe_inter_dim=4,
    n_routed_experts=6,
    n_shared_experts=0,
    n_activated_experts=4,
    n_expert_groups=1,
    n_limited_groups=1,
    route_scale=1.0,
)
CFG_S = dict(dim=16, moe_inter_dim=7, n_routed_experts=8, n_shared_experts=2, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2)
ROUTER = "the layer's routing (your ExpertRouter, 3.2)"
EXPERT = "your ExpertNetwork (3.1): "


def layer(k, cfg_kw: dict, seed: int, *, bias_std: float = 0.1, dtype: str = "double"):
    """The learner's MixtureOfExperts (``double`` or ``float``) holding the weights of the course's layer drawn from ``seed``."""
    cfg = MoEConfig(**cfg_kw)
    ref = reference_moe(cfg, seed, bias_std=bias_std, dtype=torch.float64 if dtype == "double" else torch.float32)
    state = dict(ref.state_dict())
    m = build(k, k.g.MixtureOfExperts, (remote_cfg(k, **cfg_kw),), state, "MixtureOfExperts", dtype=dtype)
    return m, cfg, ref, state


def run(m, x, name: str = "MixtureOfExperts(x)"):
    y, info = expect_tuple(m(x), 2, name)
    y = expect_tensor(y, f"{name}: output", shape=tuple(x.shape), hint="y has x's shape: return y.view(x.shape)")
    return y, routing_info(info, name)


def routing_info(info, name: str):
    assert_true(
        isinstance(info, wire.Namespace) and {"weights", "indices", "scores", "load", "kept"} <= set(info.fields),
        f"{name}: the second output should be a RoutingInfo(weights, indices, scores, load, kept), got {type(info).__name__}",
    )
    return info


def scores_of(state: dict, cfg: MoEConfig, h: torch.Tensor) -> torch.Tensor:
    z = h.to(torch.float64) @ state["gate.weight"].to(torch.float64).T
    return torch.sigmoid(z) if cfg.score_func == "sigmoid" else torch.softmax(z, -1)


def shared_out(state: dict, cfg: MoEConfig, h: torch.Tensor) -> torch.Tensor:
    return swiglu(h, *expert_weights(state, "shared_experts")) if cfg.n_shared_experts else torch.zeros_like(h)


def check_output(y: torch.Tensor, info, state: dict, cfg: MoEConfig, x: torch.Tensor, name: str) -> None:
    """The layer's output: its routing first (3.2), then the dispatch mistakes, then the values."""
    N, K = x.numel() // cfg.dim, cfg.n_activated_experts
    h = x.reshape(N, cfg.dim)
    bias = state["gate.bias"]
    s = scores_of(state, cfg, h)
    w_info = expect_tensor(info.weights, f"{name}: info.weights", shape=(N, K))
    i_info = expect_tensor(info.indices, f"{name}: info.indices", shape=(N, K), hint="the indices of the N = B*T flattened tokens")
    check_routing(w_info, i_info, s, bias, cfg, f"{name}: {ROUTER}")
    w, idx = route(s, bias, cfg)
    A = expert_outputs(state, cfg, h)
    routed, wrong = dispatch_variants(state, cfg, h, w, idx, outs=A)
    sh = shared_out(state, cfg, h)
    mistakes = {what: (v + sh).view(x.shape) for what, v in wrong.items()}
    if cfg.n_shared_experts:
        mistakes["the shared expert's output is missing: y = shared_experts(x) + the routed output"] = routed.view(x.shape)
        mistakes["the shared expert is added twice"] = (routed + 2 * sh).view(x.shape)
    for what, act in SWIGLU_MISTAKES.items():  # a wrong expert (3.1) shows in every output: name it before blaming the dispatch
        w1, w2, w3 = expert_weights(state, "shared_experts") if cfg.n_shared_experts else (None, None, None)
        sh_bad = F.linear(act(F.linear(h, w1), F.linear(h, w3)), w2) if cfg.n_shared_experts else torch.zeros_like(h)
        bad = dispatch_variants(state, cfg, h, w, idx, with_mask_mistakes=False, outs=expert_outputs(state, cfg, h, act))[0]
        mistakes[EXPERT + what] = (bad + sh_bad).view(x.shape)
    mistakes["only the first of each token's K experts contributes: sum over all K slots"] = (
        dispatch_variants(state, cfg, h, w, idx, torch.arange(K).expand(N, K) == 0, with_mask_mistakes=False, outs=A)[0] + sh
    ).view(x.shape)
    expect_close(
        y,
        (routed + sh).view(x.shape),
        atol=1e-12,
        name=f"{name}: output",
        mistakes=mistakes,
        hint="shared(x) + sum over the K chosen experts of weight * expert(x); after sorting, token = order // K "
        "and the weights must be permuted with the same order",
    )


def check_load(info, N: int, cfg: MoEConfig, name: str) -> None:
    load = expect_tensor(
        info.load,
        f"{name}: info.load",
        shape=(cfg.n_routed_experts,),
        hint="expert_load(indices, n_routed_experts): one count per expert, zeros included",
    )
    want = torch.bincount(info.indices.reshape(-1).long(), minlength=cfg.n_routed_experts).to(torch.float64)
    assert_true(
        torch.equal(load.to(torch.float64), want),
        f"{name}: info.load = {load.tolist()}, but the indices give {want.tolist()}",
        hint="load = expert_load(indices, n_routed_experts): every (token, slot) assignment counts",
    )
    assert_true(float(load.sum()) == N * cfg.n_activated_experts, f"{name}: the loads sum to {float(load.sum()):g}, expected N x K")
    assert_true(info.kept is None, f"{name}: info.kept must be None without a capacity_factor")


def judge(k, t):
    g = torch.Generator().manual_seed(33)
    built: dict = {}

    def get(kw: dict, seed: int):
        """One learner layer per configuration, built on first use and reused by later parts."""
        key = tuple(sorted(kw.items()))
        if key not in built:
            built[key] = layer(k, kw, seed)
        return built[key]

    with t.part("visible checks: output shape, info.indices (N, K), info.load counts, token 3 by hand", 2):
        m, cfg, ref, state = get(TINY, 0)
        x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
        y, info = run(m, x)
        expect_tensor(info.indices, "info.indices (N = B*T tokens, K)", shape=(10, 2))
        load = expect_tensor(info.load, "info.load", shape=(8,))
        assert_true(
            load.tolist() == torch.bincount(info.indices.flatten().long(), minlength=8).float().tolist(),
            "info.load must count assignments per expert",
            hint="expert_load(indices, n_routed_experts)",
        )
        h3 = x.reshape(10, 16)[3]
        idx = [int(e) for e in info.indices[3]]
        outs = k.many([(m.shared_experts, (h3,), {})] + [(m.experts[e], (h3,), {}) for e in idx])
        for o in outs:
            if isinstance(o, Exception):
                raise o
        want = outs[0] + sum(info.weights[3, j] * outs[1 + j] for j in range(2))
        expect_close(
            y.reshape(10, 16)[3],
            want,
            atol=1e-12,
            name="token 3",
            hint="y_t = shared(x_t) + sum_k weights[t, k] * experts[indices[t, k]](x_t)",
        )

    with t.part("the experts (3.1's SwiGLU) and the fused shared expert: silent routed experts leave exactly its output", 0.5):
        m, cfg, ref, state = get(CFG_A, 1)
        x = torch.randn(6, 12, generator=g, dtype=torch.float64)
        for who, prefix in (("shared_experts", "shared_experts"), ("experts[0]", "experts.0")):
            sub = m.shared_experts if who == "shared_experts" else m.experts[0]
            expect_close(
                expect_tensor(k.call(sub, x), f"{who}(x)"),
                swiglu(x, *expert_weights(state, prefix)),
                atol=1e-12,
                name=f"{who}(x)",
                mistakes=swiglu_mistakes(x, *expert_weights(state, prefix), who=EXPERT),
                hint="each expert is w2(silu(w1 x) * w3 x)",
            )
        silent = dict(state)
        for e in range(cfg.n_routed_experts):
            silent[f"experts.{e}.w2.weight"] = torch.zeros_like(state[f"experts.{e}.w2.weight"])
        load_state(k, m, silent, "MixtureOfExperts")
        y, _ = run(m, x)
        sh = shared_out(state, cfg, x)
        expect_close(
            y,
            sh,
            atol=1e-12,
            name="output with silent routed experts (the shared expert's alone)",
            mistakes={
                "the shared expert's output is missing: y = shared_experts(x) + the routed output": torch.zeros_like(sh),
                "the shared expert is added twice": 2 * sh,
            },
            hint="add the shared expert's output for every token",
        )

    with t.part("output against the course's layer: three configurations (no shared expert, one group), (B, T, dim) and (N, dim)", 2):
        for c_i, (kw, seed) in enumerate(((TINY, 0), (CFG_A, 1), (CFG_C, 22))):
            m, cfg, ref, state = get(kw, seed)
            if kw is CFG_A:
                load_state(k, m, state, "MixtureOfExperts")  # the experts' part silenced its routed experts
            for shape in ((3, 7, cfg.dim), (9, cfg.dim)):
                x = torch.randn(*shape, generator=g, dtype=torch.float64)
                y, info = run(m, x)
                name = f"config {c_i}, input {shape}"
                check_output(y, info, state, cfg, x, name)
                check_load(info, x.numel() // cfg.dim, cfg, name)

    with t.part("structure: each expert runs once on its own tokens (no loop over tokens, no dense compute), experts without tokens", 1):
        m, cfg, ref, state = layer(k, CFG_S, 3)
        x = torch.randn(48, 16, generator=g, dtype=torch.float64)
        _, idx = route(scores_of(state, cfg, x), state["gate.bias"], cfg)
        max_load = int(torch.bincount(idx.reshape(-1), minlength=8).max())
        prof = k.profile(m, x)
        no_token_loop(prof.shapes, cfg.moe_inter_dim, max_load, "MixtureOfExperts.forward on 48 tokens", cfg.dim)
        want = matmul_flops(cfg, x.shape[0])
        assert_true(
            prof.flops <= 1.5 * want,
            f"your layer does {prof.flops / want:.1f}x the FLOPs of the course's layer",
            hint="every expert runs on every token (dense compute): gather each expert's own tokens (x[tokens of e]) "
            "and run the expert only on those",
        )
        only = torch.full((8,), -100.0, dtype=torch.float64)
        only[4:6] = 0.0  # only experts 4 and 5 can win
        set_bias(k, m.gate, only)
        state = {**state, "gate.bias": only}
        x = torch.randn(5, 16, generator=g, dtype=torch.float64)
        y, info = run(m, x, "MixtureOfExperts(x) with only experts 4 and 5 reachable")
        assert_true(
            info.load.tolist() == [0, 0, 0, 0, 5, 5, 0, 0],
            f"info.load with only experts 4, 5 reachable: {info.load.tolist()}",
            hint="expert_load(indices, n_routed_experts) counts every expert, zeros included",
        )
        check_output(y, info, state, cfg, x, "6 of 8 experts receive no tokens")

    with t.part("dispatch honours the kept mask: skipped assignments contribute nothing; an all-True mask changes nothing", 0.5):
        m, cfg, ref, state = get(TINY, 0)
        h = torch.randn(10, 16, generator=g, dtype=torch.float64)
        w, idx = route(scores_of(state, cfg, h), state["gate.bias"], cfg)
        mask = torch.rand(10, 2, generator=g) > 0.4
        want, wrong = dispatch_variants(state, cfg, h, w, idx, mask)
        for what, act in SWIGLU_MISTAKES.items():
            wrong[EXPERT + what] = dispatch_variants(
                state, cfg, h, w, idx, mask, with_mask_mistakes=False, outs=expert_outputs(state, cfg, h, act)
            )[0]
        outs = k.many(
            [
                (m.dispatch, (h, w, idx, mask), {}),
                (m.dispatch, (h, w, idx, torch.ones(10, 2, dtype=torch.bool)), {}),
                (m.dispatch, (h, w, idx), {}),
            ],
            no_grad=True,
        )
        for o in outs:
            if isinstance(o, Exception):
                raise o
        got = expect_tensor(outs[0], "dispatch(x, weights, indices, kept)", shape=(10, 16))
        expect_close(
            got,
            want,
            atol=1e-12,
            name="dispatch with a kept mask",
            mistakes=wrong,
            hint="skip the assignments where kept is False (drop them from the sorted order before counting)",
        )
        full = expect_tensor(outs[1], "dispatch with an all-True mask")
        expect_close(
            full,
            expect_tensor(outs[2], "dispatch without a mask"),
            atol=1e-12,
            name="dispatch with an all-True kept mask vs without one",
        )

    with t.part("gradients: to the input, the gate weight and every used expert, as the course's layer; idle experts get none", 1):
        m, cfg, ref, state = get(TINY, 0)  # the last part: it changes the bias
        idle = state["gate.bias"].clone()
        idle[:2] = -100.0  # experts 0 and 1 are never chosen
        set_bias(k, m.gate, idle)
        with torch.no_grad():
            ref.gate.bias.copy_(idle)
        x = torch.randn(12, 16, generator=g, dtype=torch.float64)
        r = torch.randn(12, 16, generator=g, dtype=torch.float64)
        try:
            out = k.grad(m, x, wrt=[0], params=m, output=0, grad_out=r)
        except LearnerError as e:
            raise AssertionError(
                f"no gradient flows back through the layer ({e.type}: {e.message[:160]})\n  likely cause: "
                "the output must keep its graph: no .detach(), .data or torch.no_grad() in forward or dispatch"
            ) from None
        xg = x.clone().requires_grad_(True)
        names = [n for n, _ in ref.named_parameters()]
        grads = torch.autograd.grad((ref(xg)[0] * r).sum(), [xg, *ref.parameters()], allow_unused=True)
        for n, want in zip(names, grads[1:]):
            got = out.param_grads.get(n)
            if want is None or not bool(want.abs().sum() > 0):
                assert_true(
                    got is None or float(got.abs().max()) == 0.0,
                    f"{n} belongs to an expert that received no tokens, but it got a gradient",
                    hint="only the experts a token was routed to may run",
                )
                continue
            assert_true(
                got is not None,
                f"no gradient reaches {n}",
                hint="keep the graph: the combine weights come from the gate's scores; no .detach(), .data or torch.no_grad()"
                if n == "gate.weight"
                else "every used expert must run inside the graph",
            )
            expect_close(got, want, atol=1e-10, name=f"gradient of {n}")
        expect_close(expect_tensor(out.grads[0], "gradient of the input"), grads[0], atol=1e-10, name="gradient of the input")


_PER_TOKEN = """        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(indices.shape[1]):
                if kept is None or bool(kept[t, j]):
                    y[t] = y[t] + weights[t, j].to(x.dtype) * self.experts[int(indices[t, j])](x[t : t + 1])[0]
        return y
"""
_DENSE = """        y = torch.zeros_like(x)
        w = weights if kept is None else weights * kept
        for e, expert in enumerate(self.experts):
            coef = (w * (indices == e)).sum(-1, keepdim=True).to(x.dtype)  # (N, 1), 0 where e was not chosen
            y = y + coef * expert(x)
        return y
"""
_BODY = """        N, K = indices.shape
        expert_of = indices.reshape(-1)  # (N*K,) expert of each assignment, token-major
        slots = torch.arange(N * K, device=x.device)  # (N*K,) assignment j serves token j // K
        if kept is not None:
            slots = slots[kept.reshape(-1)]  # (S,) the assignments that stay
        slots = slots[torch.argsort(expert_of[slots], stable=True)]  # (S,) grouped by expert
        sizes = torch.bincount(expert_of[slots], minlength=len(self.experts)).tolist()  # (E,)
        flat_w = weights.reshape(-1)  # (N*K,)
        y = torch.zeros_like(x)  # (N, dim)
        start = 0
        for expert, n_e in zip(self.experts, sizes):  # a loop over experts, never over tokens
            mine = slots[start:start + n_e]  # (n_e,) this expert's assignments
            start += n_e
            if n_e:
                rows = mine // K  # (n_e,) the tokens they serve
                y.index_add_(0, rows, expert(x[rows]) * flat_w[mine].to(x.dtype).unsqueeze(-1))  # rows back to their tokens
        return y
"""
_ADD = "y.index_add_(0, rows, expert(x[rows]) * flat_w[mine].to(x.dtype).unsqueeze(-1))"

MUTANTS = [
    Mutant("token = j % K", "rows = mine // K", "rows = mine % K", expect="not j % K"),
    Mutant("weights not permuted", "flat_w[mine].to(x.dtype)", "flat_w[start - n_e : start].to(x.dtype)", expect="not permuted"),
    Mutant(
        "rows assigned, not accumulated",
        _ADD,
        "y[rows] = expert(x[rows]) * flat_w[mine].to(x.dtype).unsqueeze(-1)",
        expect="instead of accumulated",
    ),
    Mutant("weights ignored", _ADD, "y.index_add_(0, rows, expert(x[rows]))", expect="weights are ignored"),
    Mutant(
        "shared expert missing",
        "            y = y + self.shared_experts(h)\n",
        "            pass\n",
        expect="shared expert's output is missing",
    ),
    Mutant(
        "kept mask ignored",
        "            slots = slots[kept.reshape(-1)]  # (S,) the assignments that stay\n",
        "            pass\n",
        expect="kept mask is ignored",
    ),
    Mutant("per-token loop", _BODY, _PER_TOKEN, expect="loop over tokens"),
    Mutant("every expert on every token", _BODY, _DENSE, expect="dense compute"),
    Mutant(
        "weights detached",
        "flat_w = weights.reshape(-1)",
        "flat_w = weights.detach().reshape(-1)",
        expect="no gradient reaches gate.weight",
    ),
    Mutant("output not reshaped", "return y.view(x.shape), info", "return y, info", expect="return y.view(x.shape)"),
    Mutant(
        "load without minlength",
        "load=expert_load(indices, cfg.n_routed_experts)",
        "load=torch.bincount(indices.reshape(-1)).float()",
        expect="info.load",
    ),
    Mutant(
        "shared expert one expert wide",
        "ExpertNetwork(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)",
        "ExpertNetwork(cfg.dim, cfg.moe_inter_dim)",
        expect="n_shared_experts * moe_inter_dim wide",
    ),
    Mutant(
        "SwiGLU with SiLU on w3 (3.1)",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(self.w1(x) * F.silu(self.w3(x)))",
        cell="ex_03_1_expert",
        expect="ExpertNetwork (3.1): SiLU on the wrong branch",
    ),
    Mutant(
        "SwiGLU without the gate (3.1)",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(F.silu(self.w1(x)))",
        cell="ex_03_1_expert",
        expect="ExpertNetwork (3.1): the gate is missing",
    ),
    Mutant(
        "router with the bias in the weights (3.2)",
        "weights = scores.gather(1, indices)  # (N, K) unbiased",
        "weights = choice.gather(1, indices)",
        cell="ex_03_2_router",
        expect="ExpertRouter, 3.2): weights",
    ),
]

ALTERNATIVES = [
    Alternative(
        "torch.where per expert (DeepSeek's inference loop)",
        source="""
class MixtureOfExperts(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = ExpertRouter(cfg)
        self.experts = nn.ModuleList(ExpertNetwork(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = ExpertNetwork(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def dispatch(self, x, weights, indices, kept=None):
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = indices == e if kept is None else (indices == e) & kept
            tok, slot = torch.where(hit)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * weights[tok, slot].unsqueeze(-1).to(x.dtype))
        return y

    def forward(self, x):
        cfg = self.cfg
        h = x.reshape(-1, cfg.dim)
        weights, indices, scores = self.gate(h)
        kept = None
        if cfg.capacity_factor is not None:
            kept = capacity_mask(indices, cfg.n_routed_experts,
                                 expert_capacity(h.shape[0], cfg.n_activated_experts, cfg.n_routed_experts, cfg.capacity_factor))
        y = self.dispatch(h, weights, indices, kept)
        if self.shared_experts is not None:
            y = self.shared_experts(h) + y
        return y.reshape(x.shape), RoutingInfo(weights, indices, scores, expert_load(indices, cfg.n_routed_experts), kept)
""",
    ),
]
