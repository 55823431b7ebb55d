"""Unit tests for course_lib.deepseek.moe: routing, dispatch, balancing, capacity, HF parity.

The oracle below is written independently of the module: a per-token Python loop that scores, groups,
ranks and mixes experts one token at a time, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib.deepseek.moe import (
    Gate,
    MoE,
    MoEConfig,
    bias_update,
    dispatch_grouped,
    dispatch_per_expert,
    dispatch_per_token,
    dispatch_sorted,
    expert_capacity,
    expert_load,
    from_hf_checkpoint,
    max_violation,
    param_counts,
    route,
    sequence_balance_loss,
    stack_experts,
    to_hf_checkpoint,
)
from course_lib.testing import assert_close, gradcheck_fd

# ----------------------------------------------------------------------------------------------------
# independent per-token oracle
# ----------------------------------------------------------------------------------------------------


def _swiglu(x, w1, w2, w3):
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def oracle_route_token(s: list[float], b: list[float], cfg: MoEConfig, fill: float = -math.inf) -> tuple[list[int], list[float]]:
    """One token's chosen experts and weights, from its affinities ``s`` and bias ``b`` (plain Python)."""
    E, G, k = cfg.n_routed_experts, cfg.n_expert_groups, cfg.n_activated_experts
    m = E // G
    v3 = cfg.score_func == "sigmoid"
    c = [s[e] + (b[e] if v3 else 0.0) for e in range(E)]
    if G > 1:
        if v3:
            gs = [sum(sorted(c[g * m:(g + 1) * m], reverse=True)[:2]) for g in range(G)]
        else:
            gs = [max(c[g * m:(g + 1) * m]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -gs[g])[: cfg.n_limited_groups]
        c = [c[e] if e // m in kept else fill for e in range(E)]
    chosen = sorted(range(E), key=lambda e: -c[e])[:k]
    w = [s[e] for e in chosen]
    if v3:
        tot = sum(w)
        w = [wi / tot for wi in w]
    return chosen, [cfg.route_scale * wi for wi in w]


def oracle_moe(moe: MoE, x: torch.Tensor, fill: float = -math.inf) -> torch.Tensor:
    """Per-token loop MoE in float64, reading the weights of ``moe`` but none of its code."""
    cfg = moe.cfg
    Wg = moe.gate.weight.detach().double()
    b = moe.gate.bias.double().tolist()
    ex = [(e.w1.weight.detach().double(), e.w2.weight.detach().double(), e.w3.weight.detach().double()) for e in moe.experts]
    rows = []
    for xt in x.detach().double().reshape(-1, cfg.dim):
        logits = Wg @ xt
        s = (torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, 0)).tolist()
        chosen, w = oracle_route_token(s, b, cfg, fill)
        y = torch.zeros(cfg.dim, dtype=torch.float64)
        for e, wi in zip(chosen, w):
            y = y + wi * _swiglu(xt, *ex[e])
        if moe.shared_experts is not None:
            se = moe.shared_experts
            y = y + _swiglu(xt, se.w1.weight.double(), se.w2.weight.double(), se.w3.weight.double())
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def make_moe(seed: int = 0, dtype=torch.float64, bias_std: float = 0.05, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**kw)).to(dtype)
    with torch.no_grad():
        moe.gate.bias.normal_(0.0, bias_std)
    return moe


CONFIGS = [
    dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2),
    dict(dim=24, moe_inter_dim=12, n_routed_experts=12, n_shared_experts=2, n_activated_experts=3, n_expert_groups=3, n_limited_groups=1),
    dict(dim=8, moe_inter_dim=4, n_routed_experts=6, n_shared_experts=0, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1),
    dict(dim=16, moe_inter_dim=8, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
         score_func="softmax", route_scale=1.0),
]


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        MoEConfig(n_routed_experts=10, n_expert_groups=4)
    with pytest.raises(ValueError, match="n_limited_groups"):
        MoEConfig(n_limited_groups=5, n_expert_groups=4)
    with pytest.raises(ValueError, match="top-2"):
        MoEConfig(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2)
    with pytest.raises(ValueError, match="n_activated_experts"):
        MoEConfig(n_routed_experts=16, n_expert_groups=4, n_limited_groups=1, n_activated_experts=5)
    with pytest.raises(ValueError, match="score_func"):
        MoEConfig(score_func="relu")


def test_deepseek_v3_config_and_param_counts():
    cfg = MoEConfig.deepseek_v3()
    assert (cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts, cfg.n_shared_experts) == (7168, 2048, 256, 1)
    assert (cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale) == (8, 8, 4, 2.5)
    c = param_counts(cfg)
    per_expert = 3 * 7168 * 2048
    assert c["total"] == 256 * 7168 + 257 * per_expert
    assert c["active"] == 256 * 7168 + 9 * per_expert
    small = MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=8, n_expert_groups=4, n_activated_experts=2)
    assert param_counts(small)["total"] == sum(p.numel() for p in MoE(small).parameters())


# ----------------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_moe_matches_per_token_oracle(kw, seed):
    moe = make_moe(seed, **kw)
    x = torch.randn(3, 7, kw["dim"], dtype=torch.float64)
    y, info = moe(x)
    assert y.shape == x.shape and info.indices.shape == (21, kw["n_activated_experts"])
    assert_close(y, oracle_moe(moe, x), atol=1e-12, rtol=1e-12, name="MoE vs per-token oracle")  # measured <= 4e-16


def test_weights_sum_to_route_scale_and_use_unbiased_scores():
    moe = make_moe(0, **CONFIGS[0])
    h = torch.randn(50, 16, dtype=torch.float64)
    w, idx, s = moe.gate(h)
    assert_close(w.sum(-1), torch.full((50,), 2.5, dtype=torch.float64), atol=1e-12, name="sum of combine weights")
    expected = s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5
    assert_close(w, expected, atol=1e-12, name="weights from the unbiased scores")


def test_bias_changes_selection_never_weights():
    moe = make_moe(0, bias_std=0.0, **CONFIGS[0])
    h = torch.randn(200, 16, dtype=torch.float64)
    w0, idx0, s0 = moe.gate(h)
    with torch.no_grad():
        moe.gate.bias[idx0[:, 0].mode().values] -= 10.0  # evict the most popular first choice
    w1, idx1, s1 = moe.gate(h)
    assert not torch.equal(idx0, idx1), "a large bias must change which experts are chosen"
    assert_close(s1, s0, atol=0, rtol=0, name="affinities do not depend on the bias")
    expected = s1.gather(1, idx1) / s1.gather(1, idx1).sum(-1, keepdim=True) * 2.5
    assert_close(w1, expected, atol=1e-12, name="weights after the bias change (bias must not enter them)")


def test_group_score_is_top2_sum_not_max():
    # one token, 2 groups of 4: group 0 has one star expert (max 0.9), group 1 two good ones (sum 1.6)
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.8, 0.8, 0.1, 0.1]], dtype=torch.float64)
    _, idx = route(s, torch.zeros(8), top_k=2, n_groups=2, n_limited_groups=1)
    assert sorted(idx[0].tolist()) == [4, 5], "top-2 sum keeps group 1 (0.8+0.8 > 0.9+0.1)"
    _, idx = route(s, None, top_k=2, n_groups=2, n_limited_groups=1)
    assert 0 in idx[0].tolist(), "without a bias (V2 style) the group score is the max, keeping group 0"


def test_group_limit_keeps_experts_inside_kept_groups():
    moe = make_moe(3, **CONFIGS[0])
    h = torch.randn(300, 16, dtype=torch.float64)
    _, idx, s = moe.gate(h)
    c = (s + moe.gate.bias.double()).view(300, 4, 2)
    best_groups = c.topk(2, -1).values.sum(-1).topk(2, -1).indices  # (N, 2)
    in_kept = (idx.div(2, rounding_mode="floor").unsqueeze(-1) == best_groups.unsqueeze(1)).any(-1)
    assert bool(in_kept.all()), "every chosen expert must lie in one of the kept groups"


def _legacy_hf_router(scores, bias, top_k, n_group, topk_group, scale):
    """transformers 4.x DeepseekV3TopkRouter semantics: dropped groups filled with 0.0."""
    N, E = scores.shape
    choice = scores + bias
    gs = choice.view(N, n_group, -1).topk(2, dim=-1)[0].sum(-1)
    gi = gs.topk(topk_group, dim=-1, sorted=False)[1]
    gm = torch.zeros_like(gs).scatter_(1, gi, 1)
    sm = gm.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, -1)
    idx = choice.masked_fill(~sm.bool(), 0.0).topk(top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, idx


def test_negative_biased_scores_minus_inf_vs_zero_mask():
    torch.manual_seed(0)
    s = torch.rand(64, 8, dtype=torch.float64)
    bias = torch.full((8,), -1.0, dtype=torch.float64)  # every biased score s + b is now negative
    kw = dict(top_k=2, n_groups=4, n_limited_groups=2, route_scale=2.5)
    w_inf, idx_inf = route(s, bias, **kw)
    w_ref, idx_ref = route(s, torch.zeros(8, dtype=torch.float64), **kw)
    assert torch.equal(idx_inf.sort(-1).values, idx_ref.sort(-1).values), "-inf masking: a constant bias shift changes nothing"
    w0, idx0 = route(s, bias, group_mask_fill=0.0, **kw)
    groups = s.add(bias).view(64, 4, 2).topk(2, -1).values.sum(-1).topk(2, -1).indices
    outside = ~(idx0.div(2, rounding_mode="floor").unsqueeze(-1) == groups.unsqueeze(1)).any(-1)
    assert bool(outside.all()), "0.0 masking beats negative biased scores: tokens go to dropped groups"
    w_leg, idx_leg = _legacy_hf_router(s, bias, 2, 4, 2, 2.5)
    o0, oleg = idx0.sort(-1), idx_leg.sort(-1)
    assert torch.equal(o0.values, oleg.values)
    assert_close(w0.gather(1, o0.indices), w_leg.gather(1, oleg.indices), atol=1e-12, name="legacy HF (0.0 fill) weights")


def test_softmax_option_is_v2_style():
    moe = make_moe(0, **CONFIGS[3])
    h = torch.randn(20, 16, dtype=torch.float64)
    w, idx, s = moe.gate(h)
    assert_close(s.sum(-1), torch.ones(20, dtype=torch.float64), atol=1e-12, name="softmax affinities")
    assert_close(w, s.gather(1, idx), atol=1e-12, name="V2 weights: chosen probabilities, not renormalised")
    with torch.no_grad():
        moe.gate.bias.fill_(5.0)
    assert torch.equal(moe.gate(h)[1], idx), "softmax (V2) routing ignores the bias"


# ----------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dispatch_implementations_agree(seed):
    moe = make_moe(seed, dtype=torch.float32, **CONFIGS[1])
    h = torch.randn(40, 24)
    w, idx, _ = moe.gate(h)
    a, kept = dispatch_sorted(moe.experts, h, w, idx)
    assert kept is None
    b = dispatch_per_expert(moe.experts, h, w, idx)
    c = dispatch_per_token(moe.experts, h, w, idx)
    assert_close(a, b, atol=1e-6, rtol=1e-5, name="sorted vs per-expert")  # measured 0 (same matmuls)
    assert_close(a, c, atol=1e-6, rtol=1e-5, name="sorted vs per-token")  # measured ~2e-7 (row vs batch matmul)
    for impl in ("per_expert", "per_token"):
        assert_close(moe.routed(h, impl), a, atol=1e-6, rtol=1e-5, name=impl)


def test_sorted_dispatch_has_no_token_loop():
    """Counting expert calls: one call per expert with tokens, whatever the number of tokens."""
    calls = []
    experts = [lambda x, e=e: (calls.append(e), x * (e + 1))[1] for e in range(4)]
    x = torch.randn(100, 3)
    idx = torch.randint(0, 3, (100, 2))  # expert 3 never used
    w = torch.rand(100, 2)
    y, _ = dispatch_sorted(experts, x, w, idx)
    assert sorted(calls) == sorted(set(idx.flatten().tolist()))
    assert_close(y, x * ((idx + 1) * w).sum(-1, keepdim=True), atol=1e-5, name="scaled-identity experts")


def test_shared_expert_always_contributes():
    moe = make_moe(0, **CONFIGS[1])
    x = torch.randn(10, 24, dtype=torch.float64)
    with torch.no_grad():
        for e in moe.experts:
            e.w2.weight.zero_()
    y, _ = moe(x)
    assert_close(y, moe.shared_experts(x), atol=1e-12, name="output with silent routed experts")
    assert moe.shared_experts.w1.weight.shape == (2 * 12, 24), "n_shared_experts fuse into one wider MLP"


def test_gradients_reach_gate_and_every_used_expert():
    moe = make_moe(0, **CONFIGS[0])
    with torch.no_grad():
        moe.gate.bias[:2] = -100.0  # experts 0 and 1 never chosen
    x = torch.randn(4, 8, 16, dtype=torch.float64, requires_grad=True)
    y, info = moe(x)
    y.square().sum().backward()
    used = set(info.indices.flatten().tolist())
    assert used and not used & {0, 1}
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.gate.bias.grad is None and not moe.gate.bias.requires_grad
    for e, ex in enumerate(moe.experts):
        for p in ex.parameters():
            if e in used:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"expert {e} was used but got no gradient"
            else:
                assert p.grad is None, f"expert {e} received no tokens but got a gradient"
    assert moe.shared_experts.w1.weight.grad.abs().sum() > 0


def test_finite_difference_gradients():
    moe = make_moe(1, **CONFIGS[0])
    params = {k: v.detach() for k, v in moe.state_dict().items()}

    def fn(x, gw):
        return torch.func.functional_call(moe, {**params, "gate.weight": gw}, (x,))[0]

    gradcheck_fd(fn, [torch.randn(3, 16, dtype=torch.float64), params["gate.weight"].clone()], atol=1e-6, rtol=1e-5, max_entries=16)


def test_experts_with_no_tokens_and_input_validation():
    moe = make_moe(0, **CONFIGS[0])
    with torch.no_grad():
        moe.gate.bias[:] = -100.0
        moe.gate.bias[4:6] = 0.0  # only experts 4, 5 (group 2) can win
    x = torch.randn(5, 16, dtype=torch.float64)
    y, info = moe(x)
    assert info.load.tolist() == [0, 0, 0, 0, 5, 5, 0, 0]
    assert_close(y, oracle_moe(moe, x), atol=1e-12, name="output when 6 of 8 experts are idle")
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        moe(torch.randn(5, 15, dtype=torch.float64))
    empty, info = moe(torch.zeros(0, 16, dtype=torch.float64))
    assert empty.shape == (0, 16) and info.load.sum() == 0


# ----------------------------------------------------------------------------------------------------
# balancing
# ----------------------------------------------------------------------------------------------------


def test_bias_update_sign_and_magnitude():
    load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    assert_close(bias_update(load, 0.001), torch.tensor([-0.001, 0.001, 0.0, 0.0]), atol=1e-9, name="bias step")
    moe = make_moe(0, bias_std=0.0, dtype=torch.float32, **CONFIGS[0])
    moe.update_bias(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
    assert_close(moe.gate.bias, torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1]) * 1e-3, atol=1e-9, name="bias after one update")
    assert moe.gate.bias.dtype == torch.float32


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, moe_inter_dim=4, n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                    bias_update_speed=0.01)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight[0] += 1.0  # expert 0 loves positive inputs
    h = torch.randn(512, 8) + 0.5
    vio0 = max_violation(expert_load(gate(h)[1], 8))
    for _ in range(100):
        gate.update_bias(expert_load(gate(h)[1], 8))
    vio1 = max_violation(expert_load(gate(h)[1], 8))
    assert vio0 > 1.0 and vio1 < 0.3, (vio0, vio1)


def test_max_violation_and_load():
    assert max_violation(torch.tensor([10.0, 0.0, 5.0, 5.0])) == pytest.approx(1.0)
    assert max_violation(torch.full((8,), 3.0)) == 0.0
    assert expert_load(torch.tensor([[0, 1], [1, 3]]), 5).tolist() == [1, 2, 0, 1, 0]


def test_sequence_balance_loss_by_hand():
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    idx = torch.tensor([[0], [0]])
    # f = E/(K T) * hits = 4/2 * [2,0,0,0] = [4,0,0,0]; P = [0.375, 0.375, 0.125, 0.125]; L = alpha * 1.5
    assert sequence_balance_loss(s, idx, 0.1).item() == pytest.approx(0.15)
    # unnormalised sigmoid scores get divided by their row sum first
    assert sequence_balance_loss(2 * s, idx, 0.1).item() == pytest.approx(0.15)
    # perfectly balanced: f_i = 1, P_i = 1/E -> L = alpha
    u = torch.full((4, 4), 0.3)
    assert sequence_balance_loss(u, torch.tensor([[0], [1], [2], [3]]), 0.1).item() == pytest.approx(0.1)
    # per sequence, then averaged: two sequences, each collapsed on "its" favourite expert
    a = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(4, 1)
    b = torch.tensor([[0.1, 0.7, 0.1, 0.1]]).repeat(4, 1)
    idx_ab = torch.tensor([[[0]] * 4, [[1]] * 4])
    # each sequence: f = [4, 0, 0, 0] (or [0, 4, 0, 0]), P_fav = 0.7 -> L = 0.1 * 2.8; pooled would give 0.1 * 1.6
    assert sequence_balance_loss(torch.stack([a, b]), idx_ab, 0.1).item() == pytest.approx(0.28)


def test_aux_loss_in_training_only_and_differentiable():
    moe = make_moe(0, dtype=torch.float32, seq_aux_alpha=0.01, **CONFIGS[0])
    x = torch.randn(2, 10, 16)
    moe.train()
    _, info = moe(x)
    expected = sequence_balance_loss(info.scores.view(2, 10, 8), info.indices.view(2, 10, 2), 0.01)
    assert_close(info.aux_loss, expected, atol=1e-8, name="aux loss per sequence of the (B, T) input")
    info.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    moe.eval()
    assert moe(x)[1].aux_loss.item() == 0.0


def test_capacity_drops_latest_tokens():
    cfg = dict(CONFIGS[0], capacity_factor=1.0)
    moe = make_moe(0, bias_std=0.0, **cfg)
    with torch.no_grad():
        moe.gate.bias[:] = -100.0
        moe.gate.bias[4:6] = 0.0  # every token picks experts 4 and 5
    x = torch.randn(12, 16, dtype=torch.float64)
    cap = expert_capacity(12, 2, 8, 1.0)
    assert cap == 3
    y, info = moe(x)
    assert info.n_dropped == 2 * (12 - cap)
    assert info.kept[:cap].all() and not info.kept[cap:].any(), "first come, first served"
    w, idx, _ = moe.gate(x)
    expected = dispatch_per_token(moe.experts, x, w * info.kept, idx) + moe.shared_experts(x)
    assert_close(y, expected, atol=1e-12, name="output with dropped assignments")
    moe.cfg.capacity_factor = 100.0
    assert_close(moe(x)[0], oracle_moe(moe, x), atol=1e-12, name="huge capacity = no dropping")


# ----------------------------------------------------------------------------------------------------
# HF transformers
# ----------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf_pair(seed: int, impl: str, **kw):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from course_lib.deepseek.moe import hf_config, load_into_hf

    moe = make_moe(seed, dtype=torch.float32, bias_std=0.1, **kw)
    hf = DeepseekV3MoE(hf_config(moe.cfg, experts_implementation=impl)).eval()
    load_into_hf(moe, hf)
    return moe.eval(), hf


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_hf_parity(impl, kw):
    moe, hf = _hf_pair(0, impl, **kw)
    x = torch.randn(2, 16, kw["dim"])
    with torch.no_grad():
        ours, _ = moe(x)
        theirs = hf(x)
    # measured max abs diff ~2e-7 (float32 rounding; HF adds 1e-20 to the denominator)
    assert_close(ours, theirs, atol=2e-5, rtol=1e-4, name=f"MoE vs HF DeepseekV3MoE ({impl})")


def test_hf_router_uses_minus_inf_masking_like_deepseek():
    """transformers 5.x masks dropped groups with -inf: with all biased scores negative it still agrees."""
    moe, hf = _hf_pair(1, "eager", **CONFIGS[0])
    with torch.no_grad():
        moe.gate.bias.fill_(-1.0)
        hf.gate.e_score_correction_bias.fill_(-1.0)
    h = torch.randn(64, 16)
    with torch.no_grad():
        _, w_hf, idx_hf = hf.gate(h)
        w, idx, _ = moe.gate(h)
    assert torch.equal(idx.sort(-1).values, idx_hf.sort(-1).values)
    with torch.no_grad():
        assert_close(moe(h)[0], hf(h), atol=2e-5, rtol=1e-4, name="MoE vs HF with negative biased scores")
    moe.cfg.group_mask_fill = 0.0
    assert not torch.equal(moe.gate(h)[1].sort(-1).values, idx_hf.sort(-1).values), "0.0 fill differs here"


def test_hf_weight_mapping_roundtrip():
    from course_lib.deepseek.moe import load_from_hf

    moe, hf = _hf_pair(2, "eager", **CONFIGS[1])
    names = to_hf_checkpoint(moe.state_dict(), prefix="model.layers.3.mlp.")
    assert "model.layers.3.mlp.experts.5.gate_proj.weight" in names
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.3.mlp.shared_experts.down_proj.weight" in names
    back = from_hf_checkpoint(names, prefix="model.layers.3.mlp.")
    assert back.keys() == moe.state_dict().keys()
    fresh = make_moe(9, dtype=torch.float32, **CONFIGS[1])
    load_from_hf(fresh, hf)
    for k, v in moe.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_bench_smoke():
    from course_lib.deepseek.moe import bench_moe

    r = bench_moe(n_tokens=48, n_experts=8, top_k=2, dim=16, inter_dim=8, n_groups=2, n_limited_groups=1, repeats=1)
    assert r["agree"], r["max_abs_diff"]
    assert set(r["speedup_of_vectorised"]) == {"per_expert_loop", "hf_eager", "hf_grouped_mm", "per_token_loop"}


def test_given_parts_live_in_routing_and_are_re_exported():
    """Section 3's kernel imports course_lib.deepseek.routing only: it must hold no answer and import none."""
    from course_judge import static
    from course_lib.deepseek import moe, routing

    for name in routing.__all__:
        assert getattr(moe, name) is getattr(routing, name), name
    assert static.closure({"course_lib.deepseek.routing"}) == {"course_lib", "course_lib.deepseek", "course_lib.deepseek.routing",
                                                               "course_lib.deepseek.v3"}  # v3: the dimensions table, data only
    assert not hasattr(routing.MoEConfig, "param_counts") and not hasattr(routing.RoutingInfo, "max_vio")


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_dispatch_equals_sorted_dispatch():
    torch.manual_seed(16)
    cfg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
    moe = MoE(cfg).eval()
    x = torch.randn(100, 64)
    with torch.no_grad():
        w, idx, _ = moe.gate(x)
        idx[:, 0] = 3  # one expert serves every token, some serve none: empty groups in the offsets
        got = dispatch_grouped(stack_experts(moe.experts), x, w, idx)
        want, _ = dispatch_sorted(moe.experts, x, w, idx)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="grouped_mm dispatch")
