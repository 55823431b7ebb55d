"""Exercise 3.1: the SwiGLU expert and a MoE layer's total and active parameters."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_close, expect_int, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s03_moe._common import EXPERT_DRAFTS, TINY, build, remote_cfg, swiglu, swiglu_mistakes
from course_lib.deepseek.moe import param_counts
from course_lib.deepseek.routing import MoEConfig

GRADE_ID = "test_03_1_expert"
POINTS = 2
ANSWERS = ("ex_03_1_expert",)
SUMMARY = (
    "SwiGLU in float64 at three sizes against the formula of the text with every usual activation mistake named, "
    "no biases, DeepSeek-V3's 11.32 B / 0.40 B parameters, shared-expert width, no shared expert"
)
REFERENCE = ("course_lib.deepseek.moe",)
FORBIDDEN_NAMES = EXPERT_DRAFTS  # the drafts of 3.1's test hand over a correct expert


def _expert(k, dim: int, inter: int, g: torch.Generator):
    """The learner's ExpertNetwork(dim, inter) in float64 with weights drawn here; returns (handle, w1, w2, w3)."""
    shapes = {"w1.weight": (inter, dim), "w2.weight": (dim, inter), "w3.weight": (inter, dim)}
    state = {n: torch.randn(*sh, generator=g, dtype=torch.float64) / sh[1] ** 0.5 for n, sh in shapes.items()}
    e = build(
        k,
        k.g.ExpertNetwork,
        (dim, inter),
        state,
        f"ExpertNetwork({dim}, {inter})",
        names_hint="w1, w2, w3 without biases: DeepSeek's experts have no biases (nn.Linear(..., bias=False))",
    )
    return e, state["w1.weight"], state["w2.weight"], state["w3.weight"]


def _counts(fn, cfg_kw: dict, k) -> dict:
    got = fn(remote_cfg(k, **cfg_kw)) if cfg_kw is not None else None
    assert_true(
        isinstance(got, dict) and set(got) == {"total", "active"},
        f"moe_param_counts must return {{'total': ..., 'active': ...}}, got {got!r:.80}",
    )
    return {n: expect_int(v, f"moe_param_counts(...)[{n!r}]") for n, v in got.items()}


def _count_hint(got: int, cfg: MoEConfig, which: str) -> str:
    per = 3 * cfg.dim * cfg.moe_inter_dim
    gate, shared = cfg.n_routed_experts * cfg.dim, cfg.n_shared_experts * per
    n = cfg.n_routed_experts if which == "total" else cfg.n_activated_experts
    named = {
        n * per + shared: "the gate (n_routed_experts x dim) is missing: it is part of the layer and every token uses it",
        gate + n * per: "the shared experts are missing: they run on every token",
        gate + per + n * per: "the shared experts count n_shared_experts x 3 x dim x moe_inter_dim, not one expert's worth",
        gate
        + (cfg.n_shared_experts + n)
        * 2
        * cfg.dim
        * cfg.moe_inter_dim: "an expert has THREE matrices (w1, w2, w3) of dim x moe_inter_dim, not two",
        gate + (cfg.n_shared_experts + n) * cfg.dim * cfg.moe_inter_dim: "an expert has THREE matrices (w1, w2, w3) of dim x moe_inter_dim",
    }
    named[gate + cfg.n_routed_experts + shared + n * per] = (
        "the gate's bias is a buffer (moved by the balancing rule, no gradient), not a parameter: the course never counts it")
    if which == "active":
        named[gate + shared + cfg.n_routed_experts * per] = "active counts only the K_r routed experts a token uses, not all of them"
        named[shared + n * per] = "the gate is missing from the active parameters: every token runs the gate"
    return named.get(got, "gate (N_r x dim) + shared (3 x dim x N_s x I) + routed experts (3 x dim x I each; K_r of them for active)")


def _own_expert(k) -> None:
    """Fail when the notebook's ExpertNetwork is one of 3.1's test drafts (or derives from one), wherever it was
    bound: the static check sees the answer cells only."""
    assert_true(not k.call(k.lib("course_lib.expert_drafts:is_draft"), k.g.ExpertNetwork),
                "ExpertNetwork is one of the draft experts given to try test_expert on, not your own expert",
                hint="write ExpertNetwork.forward yourself; make_expert is there to test your test_expert")


def judge(k, t):
    g = torch.Generator().manual_seed(31)
    with t.part("visible checks: w1, w2, w3 without biases, output shape and dtype, a zero input, TINY's total parameters",
                0.5):
        _own_expert(k)
        e, w1, w2, w3 = _expert(k, 16, 12, g)
        x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
        expect_tensor(e(x), "expert output", shape=(3, 5, 16), dtype=torch.float64,
                      hint="the expert maps (..., dim) to (..., dim) in x's dtype")
        z = expect_tensor(e(torch.zeros(2, 16, dtype=torch.float64)), "expert output for a zero input", shape=(2, 16))
        assert_true(bool((z == 0).all()), "ExpertNetwork must map a zero input to a zero output",
                    hint="no biases and no constant term")
        c = _counts(k.g.moe_param_counts, TINY, k)
        want = param_counts(MoEConfig(**TINY))
        assert_true(
            c["total"] == want["total"],
            f"TINY total parameters: got {c['total']}, expected {want['total']}",
            hint=_count_hint(c["total"], MoEConfig(**TINY), "total"),
        )

    with t.part("SwiGLU in float64: one token, three sizes (inter_dim 1 included), every activation mistake named", 1):
        _own_expert(k)
        expect_close(
            e(x)[0, 0],
            swiglu(x[0, 0], w1, w2, w3),
            atol=1e-12,
            name="expert output for one token",
            mistakes={n: v[0, 0] for n, v in swiglu_mistakes(x, w1, w2, w3).items()},
            hint="the gate w1 x goes through SiLU, the up projection w3 x does not, w2 maps back to dim",
        )
        for dim, inter in ((8, 5), (24, 40), (16, 1)):
            e, w1, w2, w3 = _expert(k, dim, inter, g)
            x = torch.randn(7, dim, generator=g, dtype=torch.float64)
            expect_close(
                e(x),
                swiglu(x, w1, w2, w3),
                atol=1e-12,
                name=f"ExpertNetwork(dim={dim}, inter={inter}) in float64",
                mistakes=swiglu_mistakes(x, w1, w2, w3),
                hint="w2(silu(w1 x) * w3 x): SiLU on the gate w1 x only",
            )
            x3 = torch.randn(2, 3, dim, generator=g, dtype=torch.float64)
            expect_close(
                e(x3),
                swiglu(x3, w1, w2, w3),
                atol=1e-12,
                name=f"ExpertNetwork on a (2, 3, {dim}) input",
                hint="apply the projections to the last dimension only (nn.Linear does)",
            )

    with t.part("parameter counts: DeepSeek-V3 exactly, two / no shared experts, 12 experts in 3 groups", 0.5):
        v3 = MoEConfig.deepseek_v3()
        c = _counts(
            k.g.moe_param_counts,
            dict(
                dim=7168,
                moe_inter_dim=2048,
                n_routed_experts=256,
                n_shared_experts=1,
                n_activated_experts=8,
                n_expert_groups=8,
                n_limited_groups=4,
            ),
            k,
        )
        for which, want in (("total", 11_320_164_352), ("active", 398_196_736)):
            assert_true(
                c[which] == want, f"V3 MoE layer {which}: got {c[which]:,}, expected {want:,}", hint=_count_hint(c[which], v3, which)
            )
        for kw in (dict(n_shared_experts=2), dict(n_shared_experts=0), dict(n_routed_experts=12, n_expert_groups=3, n_activated_experts=3)):
            cfg_kw = dict(dim=16, moe_inter_dim=8, **kw)
            cfg = MoEConfig(**cfg_kw)
            c, want = _counts(k.g.moe_param_counts, cfg_kw, k), param_counts(cfg)
            for which in ("total", "active"):
                assert_true(
                    c[which] == want[which],
                    f"{which} parameters for {kw}: got {c[which]}, expected {want[which]}",
                    hint=_count_hint(c[which], cfg, which),
                )


MUTANTS = [
    Mutant(
        "SiLU on w3",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(self.w1(x) * F.silu(self.w3(x)))",
        expect="SiLU on the wrong branch",
    ),
    Mutant(
        "ReLU",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(F.relu(self.w1(x)) * self.w3(x))",
        expect="ReLU instead of SiLU",
    ),
    Mutant(
        "sigmoid",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(torch.sigmoid(self.w1(x)) * self.w3(x))",
        expect="sigmoid instead of SiLU",
    ),
    Mutant(
        "no gating product",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(F.silu(self.w1(x)))",
        expect="no gating product",
    ),
    Mutant(
        "SiLU of the product",
        "return self.w2(F.silu(self.w1(x)) * self.w3(x))",
        "return self.w2(F.silu(self.w1(x) * self.w3(x)))",
        expect="SiLU is applied to the product",
    ),
    Mutant("biases", "self.w1 = nn.Linear(dim, inter_dim, bias=False)", "self.w1 = nn.Linear(dim, inter_dim)", expect="no biases"),
    Mutant("gate bias counted", "gate = cfg.n_routed_experts * cfg.dim", "gate = cfg.n_routed_experts * (cfg.dim + 1)",
           expect="buffer"),
    Mutant("gate forgotten", 'return {"total": gate + shared +', 'return {"total": shared +', expect="the gate"),
    Mutant("shared not in active", '"active": gate + shared +', '"active": gate +', expect="shared experts are missing"),
    Mutant("two matrices per expert", "per_expert = 3 * cfg.dim", "per_expert = 2 * cfg.dim", expect="THREE matrices"),
    Mutant(
        "one shared expert whatever N_s", "shared = cfg.n_shared_experts * per_expert", "shared = per_expert", expect="n_shared_experts x 3"
    ),
    Mutant(
        "active counts every routed expert",
        "cfg.n_activated_experts * per_expert",
        "cfg.n_routed_experts * per_expert",
        expect="only the K_r routed experts",
    ),
]

ALTERNATIVES = [
    Alternative(
        "functional form and a formula",
        source="""
class ExpertNetwork(nn.Module):
    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        gate = x @ self.w1.weight.T
        up = torch.einsum("...d,id->...i", x, self.w3.weight)
        return (gate * torch.sigmoid(gate) * up) @ self.w2.weight.T


def moe_param_counts(cfg):
    d, i = cfg.dim, cfg.moe_inter_dim
    always = cfg.n_routed_experts * d + cfg.n_shared_experts * 3 * d * i
    return {"total": always + cfg.n_routed_experts * 3 * d * i, "active": always + cfg.n_activated_experts * 3 * d * i}
""",
    ),
]
