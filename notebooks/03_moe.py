# %% [markdown]
# # Section 3 — DeepSeekMoE
#
# In a Transformer, the feed-forward layers hold about two thirds of the parameters, and every token uses
# all of them. A **Mixture of Experts (MoE)** splits that layer into many small feed-forward networks, the
# *experts*, and lets a learned *router* send each token to only a few. Parameters then grow with the number
# of experts while the compute per token stays fixed. DeepSeek-V3 has 256 routed experts and one shared
# expert in each of its 58 MoE layers. Each token uses 8 routed experts plus the shared one: 37B of the
# model's 671B parameters are active per token. This section builds DeepSeekMoE's router and layer, makes
# the layer fast with a vectorised dispatch, and then studies the hard part, **load balancing**: keeping the
# experts evenly used without damaging what the model learns.
#
# **Learning objectives.** After this section you can
# - implement the SwiGLU expert and count a MoE layer's total and active parameters;
# - implement DeepSeek-V3's router: sigmoid affinities, a bias that only selects, group-limited top-k, and
#   normalised combine weights;
# - implement a MoE layer that groups tokens by expert instead of looping over tokens, and measure the gain;
# - implement auxiliary-loss-free balancing, the sequence-wise balance loss, MaxVio and a capacity limit, and
#   compare them on skewed data;
# - read routing statistics: expert load, collapse, specialisation, and what experts cost compared with a dense FFN.
#
# **Time:** core path about 170 min; deep dives 50 min.
#
# **Prerequisites:** Section 1.3 (MoE principles), PyTorch `nn.Module`, `torch.topk`, `torch.argsort`.
#
# **Notation.** Symbols follow the DeepSeek-V3 report (section 2.1.2); DeepSeek's code names are in brackets.
#
# | | $d$ [`dim`] | expert width [`moe_inter_dim`] | routed $N_r$ [`n_routed_experts`] | shared $N_s$ | active $K_r$ [`n_activated_experts`] | groups [`n_expert_groups`] | kept groups $M$ [`n_limited_groups`] | [`route_scale`] |
# |---|---|---|---|---|---|---|---|---|
# | DeepSeek-V3 | 7168 | 2048 | 256 | 1 | 8 | 8 | 4 | 2.5 |

# %% [given]
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import viz
from course_lib.bench import compare, ratio, threads
from course_lib.data import make_cluster_regression
from course_lib.deepseek.routing import (MoEConfig, RoutingInfo, dispatch_per_token, expert_capacity, expert_load,
                                        max_violation)
from course_lib.utils import env_report, setup, sizes

ENV = setup(seed=0)
ENV = env_report(threads=1)  # the experts here are small: a second thread only adds synchronisation
print(ENV)

# A tiny configuration for tests and figures: 8 experts in 4 groups of 2, keep 2 groups, 2 active + 1 shared.
TINY = MoEConfig(dim=16, moe_inter_dim=12, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                 n_expert_groups=4, n_limited_groups=2, route_scale=2.5)
V3 = MoEConfig.deepseek_v3()
print(TINY)

# %% [markdown]
# ### Tools you are given
# - `MoEConfig`: the fields in the notation table, plus `score_func` (`"sigmoid"` for V3, `"softmax"` for
#   V2-style routing), `capacity_factor` (None: no limit), and balancing constants you will use in 3.4.
# - `RoutingInfo(weights, indices, scores, load, kept=None)`: what a MoE forward returns next to its output.
#   `weights` (N, K) combine weights, `indices` (N, K) chosen experts, `scores` (N, E) affinities, `load` (E,)
#   assignments per expert, `kept` (N, K) the capacity mask or None.
# - `expert_load(indices, n_experts)`: assignments per expert as a float32 (E,) tensor (a `bincount`).
# - `max_violation(load)`: MaxVio, $\max_i \text{load}_i / \overline{\text{load}} - 1$, as a Python float. You wrote it
#   in Section 1.3 (with `expert_load`); from here on the course's version is given, and 3.4 uses it to measure balance.
# - `expert_capacity(n_tokens, top_k, n_experts, capacity_factor)`: $\lceil c \cdot N K / E \rceil$ slots per expert.
# - `dispatch_per_token(experts, x, weights, indices)`: the obviously right, slow routed output, one token and
#   one slot at a time. The graded benchmark compares your dispatch with it.
#
# All of them come from `course_lib.deepseek.routing`.

# %% [markdown]
# ## 3.1 The expert network
#
# Every expert, routed or shared, is the same SwiGLU feed-forward network as DeepSeek's dense layers, only
# narrower: $\mathrm{FFN}(x) = W_2\big(\mathrm{SiLU}(W_1 x) \odot W_3 x\big)$ with $W_1, W_3 \in \mathbb{R}^{I\times d}$,
# $W_2 \in \mathbb{R}^{d \times I}$, no biases, and $\mathrm{SiLU}(z) = z\,\sigma(z)$. $W_1 x$ is the *gate*, $W_3 x$
# the *up* projection, $W_2$ the *down* projection. DeepSeek-V3's dense layers have $I$ = 18432, its experts
# $I$ = 2048. This is DeepSeekMoE's *fine-grained* expert segmentation: many narrow experts instead of a few wide
# ones, so that a token can combine more, and more specialised, pieces. The $N_s$ shared experts run on
# every token. DeepSeek fuses them into one SwiGLU of width $N_s I$.
#
# Parameters of one MoE layer: the gate ($N_r d$), the shared experts ($3 d N_s I$) and the routed experts
# ($3 d I$ each). A token *uses* the gate, the shared experts and $K_r$ routed experts. The router's balancing bias
# (3.2, 3.4) is a buffer, not a parameter: it gets no gradient, and the course never counts it. This is the first
# piece of the course's one parameter counter: Section 5 counts the whole model on top of your `moe_param_counts`,
# and Section 6 plans memory with that count.
#
# **Intuition.** A dense FFN is one large committee that reviews every token. A MoE is a pool of small
# specialist committees plus a dispatcher that sends each token to a few of them. One generalist committee
# (the shared expert) still sees everything.

# %% [solution id=ex_03_1_expert]
#@save
class ExpertNetwork(nn.Module):
    """One SwiGLU expert, DeepSeek-V3 eq. 12's FFN_i: the gate w1, the up projection w3, the down projection w2
    (the formula is in the text above), no biases."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection W_1
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection W_2
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection W_3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim), in x's dtype."""
        ### BEGIN SOLUTION
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
        ### END SOLUTION


def moe_param_counts(cfg: MoEConfig) -> dict[str, int]:
    """Parameters of one MoE layer: {"total": all of them, "active": those one token uses}.

    total  = gate (N_r * dim) + shared experts (3 * dim * N_s * moe_inter_dim) + N_r routed experts (3 * dim * moe_inter_dim each)
    active = gate + shared experts + K_r routed experts (what one token multiplies with).
    The gate's bias is a buffer, not a parameter: not counted.
    """
    ### BEGIN SOLUTION
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    gate = cfg.n_routed_experts * cfg.dim
    shared = cfg.n_shared_experts * per_expert
    return {"total": gate + shared + cfg.n_routed_experts * per_expert,
            "active": gate + shared + cfg.n_activated_experts * per_expert}
    ### END SOLUTION


# %% [test id=test_03_1_expert points=2]
# Checks you can run now. When graded, the judge runs these and more (2 points): SwiGLU in float64 at three sizes against the formula of the text with every usual activation mistake named, no biases, DeepSeek-V3's 11.32 B / 0.40 B parameters, shared-expert width, no shared expert.
import torch
from course_lib.testing import assert_shape, assert_true

torch.manual_seed(0)
_e = ExpertNetwork(16, 12)
_names = sorted(n for n, _ in _e.named_parameters())
assert_true(_names == ["w1.weight", "w2.weight", "w3.weight"], f"ExpertNetwork's parameters {_names}: w1, w2, w3 without biases")
_x = torch.randn(3, 5, 16)
_y = _e(_x)
assert_shape(_y, (3, 5, 16), "expert output")
assert_true(_y.dtype == _x.dtype, f"expert output dtype {_y.dtype}, expected the input's {_x.dtype}")
assert_true(bool((_e(torch.zeros(2, 16)) == 0).all()), "a zero input must give a zero output (no biases, no constant term)")
_c = moe_param_counts(TINY)
assert_true(isinstance(_c, dict) and set(_c) == {"total", "active"}, "moe_param_counts must return {'total': ..., 'active': ...}")
assert_true(_c["total"] == 8 * 16 + 9 * 3 * 16 * 12, f"TINY total parameters: got {_c['total']}, expected {8 * 16 + 9 * 3 * 16 * 12}")
print("ExpertNetwork and moe_param_counts: visible tests passed")

# %% [markdown]
# **Checkpoint.** One DeepSeek-V3 MoE layer holds 11.32 B parameters, of which 0.40 B (3.5 %) act on each token.
# 58 such layers make up about 657 B of the model's 671 B.

# %% [markdown]
# ### A test that pins the expert down
# `forward` is one line once you know the formula; telling a right expert from an almost-right one is the
# harder skill. Write `test_expert(expert_cls)`: it receives an expert class with `ExpertNetwork`'s contract
# (`expert_cls(dim, inter_dim)` has `nn.Linear` layers `w1`, `w3` of shape (inter_dim, dim) and `w2` of shape
# (dim, inter_dim), no biases, and maps x (..., dim) to (..., dim) in x's dtype), returns None for a correct class
# however its forward is written, and raises `AssertionError` for a wrong one. Build experts, compute what the
# formula gives from their own weights, and compare within a tolerance (correct experts round differently).
# Pick inputs and sizes that make each part of the formula matter: which branch goes through SiLU, the
# product, the down projection, the shapes. The judge runs your test on correct and wrong experts it does not
# show you; `make_expert(act="relu")` below is one wrong one you can try.

# %% [given]
from course_lib.expert_drafts import make_expert  # draft expert classes built from switches, to try your test on

# %% [solution id=ex_03_1_expert_test]
def test_expert(expert_cls) -> None:
    """Check that ``expert_cls`` keeps ExpertNetwork's contract; raise AssertionError (saying what is wrong) if not."""
    ### BEGIN SOLUTION
    g = torch.Generator().manual_seed(0)
    for dim, inter in ((8, 5), (4, 12)):
        e = expert_cls(dim, inter)
        names = sorted(n for n, _ in e.named_parameters())
        assert names == ["w1.weight", "w2.weight", "w3.weight"], f"parameters {names}: w1, w2, w3 and no biases"
        w1, w2, w3 = (lin.weight.detach() for lin in (e.w1, e.w2, e.w3))
        for shape in ((7, dim), (2, 3, dim)):
            x = 3 * torch.randn(*shape, generator=g)  # large enough that SiLU, ReLU and GELU differ
            with torch.no_grad():
                y = e(x)
            assert y.shape == x.shape and y.dtype == x.dtype, f"{tuple(x.shape)} {x.dtype} -> {tuple(y.shape)} {y.dtype}"
            gate, up = x @ w1.T, x @ w3.T
            want = (gate * torch.sigmoid(gate) * up) @ w2.T
            assert torch.allclose(y, want, atol=1e-5, rtol=1e-4), f"max error {(y - want).abs().max():.2e} at {dim}, {inter}"
    ### END SOLUTION


# %% [test id=test_03_1_expert_test points=2]
# Checks you can run now. When graded, the judge runs these and more (2 points): test_expert passes correct experts written differently (SiLU as z * sigmoid(z), w1 and w3 fused, einsum, float64 inside) and catches wrong ones (another activation, SiLU on the up branch or on both, a sum for the product, no up projection, w2 skipped, biases, the dtype or the leading dimensions lost).
assert test_expert(make_expert()) is None  # your test passes a correct expert
try:
    test_expert(make_expert(act="relu"))  # an expert with ReLU where SiLU belongs
except AssertionError as _e:
    print(f"your test caught an expert with ReLU instead of SiLU: {_e}")
else:
    raise AssertionError("test_expert passed an expert with ReLU instead of SiLU: use inputs with negative gate values")
print("test_expert: visible tests passed")

# %% [markdown]
# ## 3.2 The router
#
# The router scores every expert for every token and keeps the best $K_r$. DeepSeek-V3 (eqs. 13-16) does it in five steps:
#
# 1. **Affinity** $s_{i,t} = \sigma(u_t^\top e_i)$, a sigmoid of the token $u_t$ against expert $i$'s centroid
#    $e_i$ (a row of the gate weight $W \in \mathbb{R}^{N_r \times d}$). DeepSeek-V2 used a softmax over experts.
# 2. **Selection score** $s_{i,t} + b_i$, with a per-expert bias $b_i$ that load balancing adjusts (3.4).
#    The bias only decides *which* experts are chosen. It never enters the weights and gets no gradient.
# 3. **Group limit.** The $N_r$ experts form $G$ groups (in V3 a group is the experts on one node). A group's
#    score is the **sum of its two largest** selection scores. Only the best $M$ groups stay candidates. The
#    others are masked with $-\infty$, so they can never be chosen. V3 keeps 4 of 8 groups, so a token's
#    experts sit on at most 4 nodes, which bounds its network traffic.
# 4. **Top-$K_r$** experts by selection score among the candidates.
# 5. **Weights** from the *unbiased* affinities of the chosen experts, normalised to sum to one and scaled:
#    $g_{i,t} = \text{route\_scale}\cdot s_{i,t} / \sum_{j \in \text{TopK}} s_{j,t}$.
#
# ```
#  u_t ─► s = sigmoid(W u_t) ───────────────────────────────────────────────┐ (weights)
#            │ + b (selection only)                                         │
#            ▼                                                              ▼
#         s + b ─► view (G, N_r/G) ─► top-2 sum per group ─► keep best M    gather s at the K_r chosen
#            │                                                │             ÷ their sum, × route_scale
#            ▼                                                ▼             │
#         experts of dropped groups := -inf ──────────► top-K_r indices ────┘──► (weights, indices)
# ```
#
# **Why $-\infty$ and not 0?** After a few balancing steps, biases can be negative enough that every
# $s + b$ is below zero. A masked expert set to 0 would then outrank all candidates, and the token would go
# to experts *outside* its kept groups. transformers 4.x had exactly this (`masked_fill(..., 0.0)`);
# DeepSeek's code and transformers 5 use $-\infty$.
#
# **Why sigmoid?** Softmax affinities compete: raising one expert lowers all others, and the scale of each
# weight depends on how many experts there are. Sigmoid scores each expert on its own, and the normalisation
# over the chosen $K_r$ sets the scale. With `score_func="softmax"`, implement V2 style: softmax affinities,
# no bias, a group's score is its **max**, and the top-$K_r$ weights are **not** renormalised (times `route_scale`).

# %% [solution id=ex_03_2_router]
#@save
class ExpertRouter(nn.Module):
    """DeepSeek-V3's gate (eqs. 13-16): sigmoid affinities, selection bias, group-limited top-k, normalised weights.

    weight (E, dim) holds the expert centroids e_i; bias (E,) is a float32 buffer used only to select experts.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # the default init of nn.Linear

    def affinities(self, x: torch.Tensor) -> torch.Tensor:
        """s = sigmoid(x W^T) (softmax over experts if cfg.score_func == "softmax").

        x (N, dim) -> s (N, E), computed in float32, or float64 when x is float64 (promote x's dtype with float32).
        """
        ### BEGIN SOLUTION
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = x.to(dtype) @ self.weight.to(dtype).T  # (N, E)
        if self.cfg.score_func == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)
        ### END SOLUTION

    def group_limit(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask the experts outside the cfg.n_limited_groups best groups with -inf.

        choice (N, E) selection scores; groups are contiguous blocks of E / G experts. A group's score is the
        sum of its 2 largest selection scores (sigmoid) or its max (softmax). Returns (N, E); with one group,
        choice unchanged.
        """
        ### BEGIN SOLUTION
        cfg = self.cfg
        G = cfg.n_expert_groups
        if G == 1:
            return choice
        N, E = choice.shape
        grouped = choice.view(N, G, E // G)  # (N, G, E/G)
        if cfg.score_func == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, G)
        best = group_scores.topk(cfg.n_limited_groups, dim=-1).indices  # (N, M)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).reshape(N, E)  # (N, E)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens x (N, dim).

        Returns weights (N, K) (dtype of the scores), indices (N, K) int64 and the unbiased affinities
        scores (N, E). Sigmoid: weights = route_scale * s / (sum of the chosen s); softmax: route_scale * s.
        """
        if x.dim() != 2 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"ExpertRouter expects x of shape (N, {self.cfg.dim}), got {tuple(x.shape)}")
        ### BEGIN SOLUTION
        cfg = self.cfg
        scores = self.affinities(x)  # (N, E)
        v3 = cfg.score_func == "sigmoid"
        choice = scores + self.bias.to(scores.dtype) if v3 else scores  # (N, E) selection only
        indices = self.group_limit(choice).topk(cfg.n_activated_experts, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)  # (N, K) unbiased
        if v3:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * cfg.route_scale, indices, scores
        ### END SOLUTION


# %% [test id=test_03_2_router points=7]
# Checks you can run now. When graded, the judge runs these and more (7 points): sigmoid affinities in float32/float64, group scores (top-2 sums, -inf masks), unbiased renormalised weights times route_scale, the bias selecting only and getting no gradient, every token against an oracle on four configurations (V2-style softmax included); each routing pitfall named.
import torch
from course_lib.testing import assert_close, assert_shape, assert_true

torch.manual_seed(0)
_r = ExpertRouter(TINY).double()
_h = torch.randn(40, 16, dtype=torch.float64)
_s = _r.affinities(_h)
assert_shape(_s, (40, 8), "affinities s")
assert_close(_s, torch.sigmoid(_h @ _r.weight.T), atol=1e-12, name="affinities", hint="V3 uses a sigmoid, not a softmax")
_w, _i, _sc = _r(_h)
assert_shape(_w, (40, 2), "weights")
assert_shape(_i, (40, 2), "indices")
assert_true(_i.dtype == torch.int64, f"indices must be int64, got {_i.dtype}")
assert_close(_w.sum(-1), torch.full((40,), 2.5, dtype=torch.float64), atol=1e-12, name="sum of each token's weights",
             hint="normalise the chosen affinities to sum to 1, then multiply by route_scale")
# one token, 4 groups of 2: groups 1 and 3 have the best top-2 sums
_choice = torch.tensor([[0.9, 0.0, 0.5, 0.6, 0.1, 0.2, 0.7, 0.3]], dtype=torch.float64)
_m = _r.group_limit(_choice)
assert_true(torch.isinf(_m[0, [0, 1, 4, 5]]).all() and torch.equal(_m[0, [2, 3, 6, 7]], _choice[0, [2, 3, 6, 7]]),
            f"group_limit kept the wrong experts: got {_m.tolist()}",
            hint="group scores: 0.9+0.0, 0.5+0.6, 0.1+0.2, 0.7+0.3; keep the 2 best groups (1 and 3), -inf elsewhere")
print("ExpertRouter: visible tests passed")

# %% [markdown]
# **Checkpoint.** With 8 groups and 4 kept, each V3 token chooses its 8 experts among 128 candidates, and the
# weights of those 8 always add up to 2.5.
#
# ### Looking at routing decisions
# Left: one token's selection scores $s + b$, coloured by group. Grey bars are experts in dropped groups; stars
# mark the chosen experts. Right: the combine weights of 24 tokens (a row per token). A random router
# already spreads tokens over many experts, but not evenly.

# %% [code]
torch.manual_seed(0)
demo_cfg = MoEConfig(dim=16, moe_inter_dim=8, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
demo_router = ExpertRouter(demo_cfg)
with torch.no_grad():
    demo_router.bias.normal_(0.0, 0.05)
    h_demo = torch.randn(24, 16)
    w_demo, i_demo, s_demo = demo_router(h_demo)
    sel = (s_demo + demo_router.bias)[0]
    kept = torch.isfinite(demo_router.group_limit((s_demo + demo_router.bias)[:1]))[0]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
per_group = demo_cfg.n_routed_experts // demo_cfg.n_expert_groups
palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
colors = [palette[e // per_group] if kept[e] else "lightgrey" for e in range(demo_cfg.n_routed_experts)]
ax1.bar(range(demo_cfg.n_routed_experts), sel.numpy(), color=colors)
ax1.scatter(i_demo[0].numpy(), sel[i_demo[0]].numpy() + 0.02, marker="*", s=120, color="k", label="chosen")
ax1.set_xlabel("expert (4 groups of 4)")
ax1.set_ylabel("selection score s + b")
ax1.set_title("One token: kept groups in colour, dropped in grey")
ax1.legend()
dense_w = torch.zeros(24, demo_cfg.n_routed_experts).scatter_(1, i_demo, w_demo)
im = ax2.imshow(dense_w.numpy(), aspect="auto", cmap="rocket_r" if "rocket_r" in plt.colormaps() else "viridis")
ax2.grid(False)
fig.colorbar(im, ax=ax2, label="combine weight g")
ax2.set_xticks(range(0, demo_cfg.n_routed_experts, 2))
ax2.set_xlabel("expert")
ax2.set_ylabel("token")
ax2.set_title("Combine weights (each row sums to 2.5)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3.3 The MoE layer
#
# The layer adds the shared experts and the weighted routed experts (V3 eq. 12, without the residual that the
# block adds):
# $$h'_t = \sum_{i=1}^{N_s} \mathrm{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{N_r} g_{i,t}\, \mathrm{FFN}^{(r)}_i(u_t),
# \qquad g_{i,t} = 0 \text{ unless } i \in \text{TopK}.$$
#
# The obvious implementation loops over tokens and calls $K$ experts for each: $N K$ tiny matrix-vector
# products, each paying Python and kernel-launch overhead. Instead, **group the work by expert**. Flatten the
# $N \times K$ (token, expert) assignments, sort them by expert with a *stable* `argsort`, and count each
# expert's assignments with `bincount`. The sorted assignments now form one contiguous slice per expert:
# split them by the counts, let each expert gather its tokens' rows and run once on all of them, scale the
# outputs by their weights, and add them back to their tokens with `index_add_`. The only Python loop runs
# over the $E$ experts, never over the tokens.
#
# ```
#  indices (N=4, K=2)   flat, token-major        stable argsort by expert     split by counts [2, 2, 3, 1]
#   t0: [2, 0]          [2, 0, 1, 2, 0, 3, 2, 1]  expert 0: slots 1, 4 (t0, t2)   E0(x[[0, 2]])
#   t1: [1, 2]          token of slot j = j // K  expert 1: slots 2, 7 (t1, t3)   E1(x[[1, 3]])
#   t2: [0, 3]                                    expert 2: slots 0, 3, 6         E2(x[[0, 1, 3]])
#   t3: [2, 1]                                    expert 3: slot 5 (t2)           E3(x[[2]])
#   for each expert e:  y.index_add_(0, tokens of e, E_e(x[tokens of e]) * weights of e)
# ```
#
# `dispatch` also takes an optional `kept` mask (N, K): assignments marked False (dropped by a capacity
# limit, 3.4) are skipped entirely. `forward` builds it with your `capacity_mask` from 3.4 only when
# `cfg.capacity_factor` is set. Until you have written 3.4, leave `capacity_factor=None`.

# %% [solution id=ex_03_3_moe]
#@save
class MixtureOfExperts(nn.Module):
    """DeepSeekMoE layer: shared experts + routed experts chosen by ExpertRouter (DeepSeek-V3 eq. 12).

    Parameter names match course_lib.deepseek.moe.MoE: gate.weight, gate.bias, experts.{i}.w1/w2/w3, shared_experts.w1/w2/w3.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = ExpertRouter(cfg)
        self.experts = nn.ModuleList(ExpertNetwork(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        # the N_s shared experts fused into one SwiGLU of width N_s * moe_inter_dim (as DeepSeek's code)
        self.shared_experts = ExpertNetwork(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 kept: torch.Tensor | None = None) -> torch.Tensor:
        """Routed output y_t = sum_k weights[t, k] * experts[indices[t, k]](x_t), grouped by expert.

        x (N, dim); weights, indices (N, K); kept (N, K) bool or None (False: skip that assignment).
        Returns (N, dim) in x's dtype. Calls each expert at most once; no Python loop over tokens.
        """
        ### BEGIN SOLUTION
        N, K = indices.shape
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
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        """x (B, T, dim) or (N, dim) -> (y of x's shape, RoutingInfo for the N = B*T tokens).

        y = shared_experts(x) + routed output. The RoutingInfo holds the router's weights, indices and scores,
        load = expert_load(indices, E) (before any capacity dropping) and kept (None without capacity_factor).
        """
        if x.dim() not in (2, 3) or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"MixtureOfExperts expects x of shape (B, T, {self.cfg.dim}) or (N, {self.cfg.dim}), got {tuple(x.shape)}")
        ### BEGIN SOLUTION
        cfg = self.cfg
        h = x.reshape(-1, cfg.dim)  # (N, dim)
        weights, indices, scores = self.gate(h)  # (N, K), (N, K), (N, E)
        kept = None
        if cfg.capacity_factor is not None:
            cap = expert_capacity(h.shape[0], cfg.n_activated_experts, cfg.n_routed_experts, cfg.capacity_factor)
            kept = capacity_mask(indices, cfg.n_routed_experts, cap)  # (N, K)
        y = self.dispatch(h, weights, indices, kept)  # (N, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        info = RoutingInfo(weights=weights, indices=indices, scores=scores, load=expert_load(indices, cfg.n_routed_experts), kept=kept)
        return y.view(x.shape), info
        ### END SOLUTION


# %% [test id=test_03_3_moe points=7]
# Checks you can run now. When graded, the judge runs these and more (7 points): the experts' SwiGLU and the fused shared expert, the output against the course's layer on three configurations and both input shapes with every dispatch mistake named, info.load, no loop over tokens and no dense compute (profiled), experts without tokens, gradients to the gate and the used experts only, the kept mask.
import torch
from course_lib.testing import assert_close, assert_shape, assert_true

torch.manual_seed(0)
_moe = MixtureOfExperts(TINY).double()
_x = torch.randn(2, 5, 16, dtype=torch.float64)
_y, _info = _moe(_x)
assert_shape(_y, (2, 5, 16), "MoE output")
assert_shape(_info.indices, (10, 2), "info.indices (N = B*T tokens, K)")
assert_true(_info.load.tolist() == torch.bincount(_info.indices.flatten(), minlength=8).float().tolist(), "info.load must count assignments per expert")
# token 3 by hand, with your router's choice
_h = _x.reshape(10, 16)[3]
_want = _moe.shared_experts(_h) + sum(_info.weights[3, k] * _moe.experts[int(_info.indices[3, k])](_h) for k in range(2))
assert_close(_y.reshape(10, 16)[3], _want, atol=1e-12, name="token 3",
             hint="y_t = shared(x_t) + sum_k weights[t, k] * experts[indices[t, k]](x_t)")
print("MixtureOfExperts: visible tests passed")

# %% [markdown]
# **Checkpoint.** Your layer calls each expert once per forward, whatever the number of tokens.

# %% [markdown]
# ## 3.4 Load balancing
#
# Nothing in the task loss asks the router to use the experts evenly. Early in training some experts happen
# to get more tokens, they improve faster, and the router sends them even more: **routing collapse**. The idle
# experts waste parameters, and with experts spread over GPUs the busiest one sets everyone's pace. We measure
# imbalance with **MaxVio** (Wang et al., 2024) over a batch's loads $\text{load}_i$ (assignments per expert):
# $$\text{MaxVio} = \frac{\max_i \text{load}_i}{\overline{\text{load}}} - 1 \qquad (0 = \text{perfect balance}).$$
# This is Section 1.3's `max_violation`, given here (see "Tools you are given"): the experiments below measure with it.
#
# **Auxiliary-loss-free balancing (V3).** Earlier MoEs added a balance loss to the task loss. The loss
# balances, but its gradient competes with the task's. DeepSeek-V3 instead nudges the selection bias after
# every training step, with no gradient involved:
# $$b_i \leftarrow b_i + \gamma\, \mathrm{sign}\big(\overline{\text{load}} - \text{load}_i\big),$$
# so an overloaded expert becomes a little less attractive and an idle one a little more. V3 used
# $\gamma$ = 0.001 for most of training and 0 at the end. Because the bias only selects (3.2), the weights,
# and hence the gradients, never see it.
#
# **Complementary sequence-wise balance loss (V3 eqs. 17-20).** A tiny loss (α = 1e-4) keeps single sequences
# from piling onto a few experts. For one sequence of $T$ tokens:
# $$\mathcal{L}_{\text{Bal}} = \alpha \sum_{i=1}^{N_r} f_i P_i,\quad
# f_i = \frac{N_r}{K_r T}\sum_{t=1}^{T} \mathbb{1}\big(i \in \text{TopK}_t\big),\quad
# s'_{i,t} = \frac{s_{i,t}}{\sum_{j=1}^{N_r} s_{j,t}},\quad P_i = \frac{1}{T}\sum_{t=1}^{T} s'_{i,t}.$$
# $f_i$ counts hits (no gradient) and is 1 for every expert under perfect balance; $P_i$ carries the gradient.
# With a batch of sequences, compute the loss per sequence and average.
#
# **Capacity factor (for comparison).** GShard and Switch Transformer give each expert a fixed number of slots,
# $C = \lceil c \cdot N K / E \rceil$, and *drop* the assignments beyond it (first come, first served, in
# token order). Static shapes suit accelerators, but dropped tokens lose that expert's contribution.
# DeepSeek-V3 drops no tokens, in training or inference. Its balancing makes the limit unnecessary.
#
# **Intuition.** The bias works like a price: busy experts get more expensive and quiet ones cheaper, until
# demand evens out. The balance loss is more like a tax in the loss, and every gradient step pays it.

# %% [solution id=ex_03_4_balance]
#@save
def bias_update(load: torch.Tensor, gamma: float) -> torch.Tensor:
    """The auxiliary-loss-free step: returns delta (E,) float32 with delta_i = gamma * sign(mean(load) - load_i).

    Add it to the router's bias after each training step: router.bias += bias_update(load, gamma).
    """
    ### BEGIN SOLUTION
    load = load.to(torch.float32)
    return gamma * torch.sign(load.mean() - load)
    ### END SOLUTION


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss (V3 eqs. 17-20), computed per sequence and averaged over the batch.

    scores (B, T, E) unbiased affinities s (normalised over the E experts inside: s' = s / sum_j s_j);
    indices (B, T, K) chosen experts. Returns a scalar tensor; gradients flow through P (the scores) only.
    """
    ### BEGIN SOLUTION
    B, T, E = scores.shape
    K = indices.shape[-1]
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    hits = torch.zeros(B, E, dtype=scores.dtype).scatter_add_(1, indices.reshape(B, T * K),
                                                             torch.ones(B, T * K, dtype=scores.dtype))  # (B, E)
    f = hits * E / (K * T)  # (B, E)
    return alpha * (f * P).sum(dim=-1).mean()
    ### END SOLUTION


def capacity_mask(indices: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit: kept (N, K) bool, True for the first `capacity` assignments of each expert.

    "First" means token order, then slot order (the flattened, token-major order of indices). Vectorised.
    """
    ### BEGIN SOLUTION
    N, K = indices.shape
    onehot = F.one_hot(indices.reshape(-1), n_experts)  # (N*K, E)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (N*K,) place in its expert's queue
    return (rank < capacity).view(N, K)
    ### END SOLUTION


# %% [test id=test_03_4_balance points=5]
# Checks you can run now. When graded, the judge runs these and more (5 points): the bias update's sign, size, ties and dtype, the sequence-wise loss per sequence with normalised scores and its gradient, first-come-first-served capacity masks, and the layer with a capacity factor (kept mask, dropped tokens, info.load counted before dropping).
import torch
from course_lib.testing import assert_close, assert_true

assert_close(bias_update(torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.001), torch.tensor([-0.001, 0.001, 0.0, 0.0]), atol=1e-9,
             name="bias_update([10, 0, 5, 5], 0.001)")
_s = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
assert_true(abs(sequence_balance_loss(_s, torch.tensor([[[0], [0]]]), 0.1).item() - 0.15) < 1e-6,
            "sequence_balance_loss of the 2-token example: f = [4, 0, 0, 0], P = [0.375, 0.375, 0.125, 0.125] -> 0.1 * 1.5")
assert_true(capacity_mask(torch.tensor([[0, 1], [0, 2], [0, 1]]), 3, 2).tolist() == [[True, True], [True, True], [False, True]],
            "capacity_mask: expert 0's third assignment (token 2) must be dropped with capacity 2")
print("load balancing: visible tests passed")

# %% [markdown]
# **Checkpoint.** An expert with 3x the mean load loses exactly $\gamma$ of bias per step, however overloaded
# it is: the update is a sign, not a gradient.
#
# ## 3.5 Experiments: balancing, collapse, specialisation, cost
#
# **The task.** Tokens come from 8 clusters, and a token's target applies its cluster's own random map,
# $y = \tanh(A_c x)$ (`course_lib.data.make_cluster_regression`). The cluster mix is skewed (Zipf, skew 1.5):
# the largest cluster supplies about half of the tokens. The model is one of your MoE layers (16 routed experts in
# 4 groups, 2 kept, top-2, one shared expert) trained with AdamW on the mean squared error. We train it three
# ways, from the same initialisation and on the same batches:
#
# | run | what balances the load |
# |---|---|
# | `none` | nothing |
# | `seq_loss` | the sequence-wise balance loss, with α = 0.1 (V3's 1e-4 is far too weak for 100 steps of a toy) |
# | `bias` | the auxiliary-loss-free bias update, with γ = 0.01 (V3: 0.001 over hundreds of thousands of steps) |

# %% [code]
EXP = MoEConfig(dim=32, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5)
TASK = make_cluster_regression(n_clusters=8, dim=EXP.dim, skew=1.5, noise=0.5, seed=0)
STEPS = sizes(100, 150)
BATCH, SEQ = 8, 32
x_eval, y_eval, c_eval = TASK.sample(16, 64, generator=torch.Generator().manual_seed(1234))  # held-out tokens


def train(model: nn.Module, steps: int = STEPS, mode: str = "none", alpha: float = 0.1, gamma: float = 0.01,
          task=TASK, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train `model` (your MixtureOfExperts, or any module mapping x to y) on `task`; record loss and routing.

    mode: "none", "seq_loss" (add sequence_balance_loss * alpha) or "bias" (bias_update with gamma after each step).
    """
    gen = torch.Generator().manual_seed(seed)  # the same batches for every run
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    hist = {"loss": [], "maxvio": [], "load": [], "bias": [], "step_s": []}
    for _ in range(steps):
        x, y, _ = task.sample(BATCH, SEQ, generator=gen)
        t0 = time.perf_counter()
        out = model(x)
        out, info = out if isinstance(out, tuple) else (out, None)
        loss = F.mse_loss(out, y)
        total = loss
        if info is not None and mode == "seq_loss":
            E, K = model.cfg.n_routed_experts, model.cfg.n_activated_experts
            total = total + sequence_balance_loss(info.scores.view(BATCH, SEQ, E), info.indices.view(BATCH, SEQ, K), alpha)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if info is not None and mode == "bias":
            with torch.no_grad():
                model.gate.bias += bias_update(info.load, gamma)
        hist["step_s"].append(time.perf_counter() - t0)
        hist["loss"].append(loss.item())
        if info is not None:
            hist["maxvio"].append(max_violation(info.load))
            hist["load"].append(info.load.clone())
            hist["bias"].append(model.gate.bias.detach().clone())
    model.eval()
    with torch.no_grad():
        out = model(x_eval)
        out, info = out if isinstance(out, tuple) else (out, None)
        hist["eval_loss"] = F.mse_loss(out, y_eval).item()
        hist["eval_maxvio"] = max_violation(info.load) if info is not None else float("nan")
    model.train()
    return hist


runs, models = {}, {}
for mode in ("none", "seq_loss", "bias"):
    torch.manual_seed(0)  # the same initial weights for every run
    models[mode] = MixtureOfExperts(EXP)
    runs[mode] = train(models[mode], mode=mode)
    print(f"{mode:9s} held-out MSE {runs[mode]['eval_loss']:.4f} | held-out MaxVio {runs[mode]['eval_maxvio']:.2f} | "
          f"MaxVio over the last 20 steps {np.mean(runs[mode]['maxvio'][-20:]):.2f}")

# %% [markdown]
# ### Load balancing: no balancing vs sequence-wise loss vs bias update

# %% [code]
def smooth(v, k: int = 5):
    v = np.asarray(v, dtype=float)
    return np.convolve(v, np.ones(k) / k, mode="valid")


fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for mode, h in runs.items():
    axes[0].plot(smooth(h["maxvio"]), label=mode)
    axes[1].plot(smooth(h["loss"]), label=mode)
axes[0].set_xlabel("training step")
axes[0].set_ylabel("MaxVio (5-step mean)")
axes[0].set_title("Imbalance during training")
axes[0].legend()
axes[1].set_xlabel("training step")
axes[1].set_ylabel("training MSE (5-step mean)")
axes[1].set_yscale("log")
axes[1].set_title("Task loss")
axes[1].legend()
width = 0.27
for j, (mode, h) in enumerate(runs.items()):
    final = torch.stack(h["load"][-10:]).mean(0)
    axes[2].bar(np.arange(EXP.n_routed_experts) + (j - 1) * width, final.numpy(), width=width, label=mode)
axes[2].axhline(BATCH * SEQ * EXP.n_activated_experts / EXP.n_routed_experts, color="k", ls="--", lw=1, label="balanced")
axes[2].set_xticks(range(0, EXP.n_routed_experts, 2))
axes[2].set_xlabel("expert")
axes[2].set_ylabel("assignments per step (last 10 steps)")
axes[2].set_title("Final load per expert")
axes[2].legend(fontsize=8)
fig.suptitle("Balancing 16 experts on skewed clusters (same data, same initialisation)")
fig.tight_layout()
plt.show()

# %% [markdown]
# **What to look for.** Without balancing, a few experts take most of the assignments and some get none: the
# router has collapsed onto the experts that serve the dominant cluster. The balance loss at α = 0.1 evens the
# load, but its gradient pulls the router away from the task, and the task loss rises. The bias update reaches
# a similar balance with a smaller loss penalty, because it never touches the gradients. On this toy, the
# unbalanced model fits best: nothing here charges for an overloaded expert. With expert parallelism the
# busiest expert sets the step time, and with a capacity limit (try the explorer below) the overflow is
# dropped: those are the costs that balancing avoids. Numbers come from one seed and 100 steps (150
# interactively); expect run-to-run spread.
#
# ### Expert utilisation dashboard (bias-update run)
# Load per expert over training (top left), which experts the held-out tokens use, sorted by cluster (top
# right), the MaxVio curve (bottom left) and each expert's bias (bottom right). The largest cluster's
# experts are pushed down and the idle ones pulled up, until the load evens out.

# %% [code]
if "bias" not in runs:  # the balancing runs above need 3.3 and 3.4
    print("(finish 3.3 and 3.4 above to see the dashboard)")
else:
    with torch.no_grad():
        _, info_eval = models["bias"](x_eval.reshape(-1, EXP.dim))
    order = torch.argsort(c_eval.flatten(), stable=True)[:: max(1, c_eval.numel() // 64)][:64]  # 64 tokens, sorted by cluster
    assign = torch.zeros(c_eval.numel(), EXP.n_routed_experts).scatter_(1, info_eval.indices, info_eval.weights)[order]
    fig = viz.create_expert_dashboard(
        {"load": torch.stack(runs["bias"]["load"]), "assignments": assign, "maxvio": runs["bias"]["maxvio"],
         "bias": torch.stack(runs["bias"]["bias"])},
        title="Auxiliary-loss-free balancing: 16 experts, skewed clusters",
    )
    plt.show()

# %% [markdown]
# ### Expert specialisation
# For each cluster (row), the share of its held-out tokens' expert slots that each expert (column) takes.
# Without balancing, each cluster sends nearly all its tokens to the same two experts, so the two experts of
# the dominant cluster carry about half of all assignments. With the bias update, the dominant cluster spreads
# thinly over many experts, and the smaller clusters still go to a few experts each. Specialisation survives
# balancing.

# %% [code]
def routing_matrix(model: MixtureOfExperts, x: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """(C, E): share of each cluster's expert slots taken by each expert."""
    with torch.no_grad():
        _, info = model(x.reshape(-1, model.cfg.dim))
    C, E = int(clusters.max()) + 1, model.cfg.n_routed_experts
    hits = torch.zeros(C, E)
    hits.index_put_((clusters.flatten().repeat_interleave(info.indices.shape[1]), info.indices.flatten()),
                    torch.ones(info.indices.numel()), accumulate=True)
    return hits / hits.sum(1, keepdim=True).clamp_min(1)


if not {"none", "bias"} <= set(runs):  # the balancing runs above need 3.3 and 3.4
    print("(finish 3.3 and 3.4 above to see this figure)")
else:
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for ax, mode in zip(axes, ("none", "bias")):
        im = ax.imshow(routing_matrix(models[mode], x_eval, c_eval).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(0, EXP.n_routed_experts, 2))
        ax.set_xlabel("expert")
        ax.set_ylabel("cluster (0 = most frequent)")
        ax.set_title(f"{mode}: share of each cluster's slots per expert")
        ax.grid(False)
    fig.colorbar(im, ax=axes, label="share of slots")
    plt.show()
share = (torch.bincount(c_eval.flatten(), minlength=8).float() / c_eval.numel()).tolist()
print("cluster frequencies (held-out):", [f"{p:.2f}" for p in share])

# %% [markdown]
# ### MoE vs a dense FFN with the same active parameters
# A dense SwiGLU of width $(K_r + N_s) \cdot I$ = 96 uses as many parameters per token as the MoE (minus its
# 512-parameter gate), but holds 6x fewer parameters in total. Same data, same optimiser, same number of steps.

# %% [code]
if "bias" not in runs:  # the balancing runs above need 3.3 and 3.4
    print("(finish 3.3 and 3.4 above to see this comparison)")
else:
    torch.manual_seed(0)
    dense = ExpertNetwork(EXP.dim, (EXP.n_activated_experts + EXP.n_shared_experts) * EXP.moe_inter_dim)
    runs["dense"] = train(dense)
    n_dense = sum(p.numel() for p in dense.parameters())
    counts = moe_param_counts(EXP)
    step_ratio = np.median(runs["bias"]["step_s"]) / np.median(runs["dense"]["step_s"])
    print(f"dense FFN : {n_dense:6d} parameters (all active) | held-out MSE {runs['dense']['eval_loss']:.4f}")
    print(f"MoE (bias): {counts['total']:6d} parameters, {counts['active']} active | held-out MSE {runs['bias']['eval_loss']:.4f}")
    print(f"a MoE training step takes {step_ratio:.1f}x as long as a dense one on this CPU (median of {STEPS} steps)")
    fig, ax = plt.subplots()
    ax.plot(smooth(runs["dense"]["loss"]), label=f"dense FFN ({n_dense:,} params)")
    ax.plot(smooth(runs["bias"]["loss"]), label=f"MoE, bias balancing ({counts['active']:,} active of {counts['total']:,})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training MSE (5-step mean)")
    ax.set_title("Equal active parameters: MoE vs dense FFN")
    ax.legend()
    plt.show()

# %% [markdown]
# **What to look for.** The MoE fits the eight cluster maps better: each token gets experts that only need to
# learn one or two maps, while the dense network must fit all eight with the same per-token budget. On a CPU
# the MoE step is slower than its FLOPs suggest: sorting, gathering and sixteen small matrix products cost
# more than one large one. Production MoEs win back that overhead with grouped GEMM kernels and large batches
# per expert.
#
# ### Scaling with the number of experts
# Keep $K_r$ = 2 and the expert width fixed, and grow $N_r$ (no groups). Total parameters grow linearly,
# active parameters and FLOPs per token barely move (only the gate grows). The forward time of your layer
# grows slowly with the per-expert overhead. A dense FFN holding the same *total* parameters grows linearly.

# %% [code]
n_tok = sizes(512, 1024)
expert_counts = sizes([4, 8, 16, 32], [4, 8, 16, 32, 64])
rows = []
with torch.no_grad(), threads(1):
    x_s = torch.randn(n_tok, EXP.dim)
    for E in expert_counts:
        cfg_e = MoEConfig(dim=EXP.dim, moe_inter_dim=EXP.moe_inter_dim, n_routed_experts=E, n_shared_experts=1,
                          n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
        torch.manual_seed(0)
        moe_e = MixtureOfExperts(cfg_e).eval()
        dense_total = ExpertNetwork(EXP.dim, (E + 1) * EXP.moe_inter_dim)
        t = compare({"moe": lambda m=moe_e: m(x_s), "dense_same_total": lambda d=dense_total: d(x_s)}, warmup=1, repeats=5)
        c = moe_param_counts(cfg_e)
        rows.append((E, c["total"], c["active"], 2 * c["active"], 1e6 * t["moe"].median / n_tok, 1e6 * t["dense_same_total"].median / n_tok))
rows = np.array(rows, dtype=float)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(rows[:, 0], rows[:, 1], marker="o", label="total parameters")
ax1.plot(rows[:, 0], rows[:, 2], marker="o", label="active parameters")
ax1.plot(rows[:, 0], rows[:, 3], marker="s", ls="--", label="FLOPs per token (2 x active)")
ax1.set_xscale("log", base=2)
ax1.set_yscale("log")
ax1.set_xlabel("routed experts N_r (K_r = 2)")
ax1.set_ylabel("count")
ax1.set_title("Parameters grow, compute per token does not")
ax1.legend()
ax2.plot(rows[:, 0], rows[:, 4], marker="o", label="your MoE layer")
ax2.plot(rows[:, 0], rows[:, 5], marker="o", label="dense FFN, same total parameters")
ax2.set_xscale("log", base=2)
ax2.set_xlabel("routed experts N_r")
ax2.set_ylabel("forward time per token (µs, 1 thread)")
ax2.set_title(f"Forward time, {n_tok} tokens (this CPU)")
ax2.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Interactive: balancing explorer
# Choose the bias update speed γ, the skew of the cluster mix, and a capacity factor. A short training run
# (50 steps) shows how fast the load evens out, and how many assignments a capacity limit drops without
# balancing and with it. γ = 0 is the unbalanced baseline. In JupyterLab you get dropdowns; otherwise the
# first choice is drawn.

# %% [code]
import dataclasses


def balance_explorer(gamma: float = 0.01, skew: float = 1.5, capacity_factor: float = 1.25):
    task = make_cluster_regression(n_clusters=8, dim=EXP.dim, skew=skew, noise=0.5, seed=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
    for g in sorted({0.0, gamma}):
        torch.manual_seed(0)
        model = MixtureOfExperts(EXP)
        h = train(model, steps=50, mode="bias", gamma=g, task=task)
        model.cfg = dataclasses.replace(EXP, capacity_factor=capacity_factor)  # limit only for the evaluation
        with torch.no_grad():
            _, info = model(x_eval.reshape(-1, EXP.dim))
        model.cfg = EXP
        ax1.plot(smooth(h["maxvio"]), label=f"gamma = {g}")
        ax2.bar(f"gamma = {g}", 100 * info.n_dropped / info.indices.numel())
    ax1.set_xlabel("training step")
    ax1.set_ylabel("MaxVio (5-step mean)")
    ax1.set_title(f"Imbalance, skew {skew}")
    ax1.legend()
    ax2.set_ylabel("assignments dropped (%)")
    ax2.set_title(f"Held-out tokens dropped at capacity factor {capacity_factor}")
    fig.tight_layout()
    plt.show()


viz.interactive(balance_explorer, gamma=[0.01, 0.001, 0.03], skew=[1.5, 0.0, 3.0], capacity_factor=[1.25, 1.0, 2.0])

# %% [markdown]
# ### Graded benchmark: grouped dispatch vs a per-token loop
# Your `MixtureOfExperts.dispatch` against `dispatch_per_token` from `course_lib.deepseek.routing`, which calls
# your own experts one token and one slot at a time: the same experts and the same routing, only the dispatch
# differs: 16 experts, top-4. Points require that your layer agrees with the course's reference layer on the same
# weights, that your dispatch agrees with the course's, and that a profile of it shows no loop over tokens and no
# dense compute. Then the grader times both itself at 512 tokens, every call on fresh inputs, and your dispatch
# must be at least **10x** faster per call. The cell below times 1024 tokens when you run it (512 in a light run);
# a correct solution measures 40x or more there on the course's 2-core CPU (one thread). The grader's figure reads
# lower (20-40x): fewer tokens, and each of its measurements includes a round trip to your kernel.

# %% [test id=bench_03_dispatch points=2]
# Checks you can run now. When graded, the judge runs these and more (2 points): your layer and your dispatch against the course's on the same weights (float32), a profile without a loop over tokens or dense compute, then your dispatch at least 10x faster per call than the course's per-token loop on the same weights (512 tokens, 16 experts, top-4; both timed by the judge).
import torch as _t
from course_lib.bench import compare as _compare, ratio as _ratio, threads as _threads
from course_lib.testing import assert_close as _close
from course_lib.utils import sizes as _sizes

_cfg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                 n_limited_groups=2)
_n = _sizes(512, 1024)
_t.manual_seed(0)
_moe = MixtureOfExperts(_cfg).eval()
with _t.no_grad():
    _moe.gate.bias.normal_(0.0, 0.05)
    _x = _t.randn(_n, _cfg.dim)
    _w, _i, _ = _moe.gate(_x)

    def _loop():
        return dispatch_per_token(_moe.experts, _x, _w, _i)

    def _fast():
        return _moe.dispatch(_x, _w, _i)

    # correctness first (float32): measured max abs difference ~2e-7 (row-by-row vs batched matmuls)
    _close(_fast(), _loop(), atol=1e-5, rtol=1e-4, name="grouped dispatch vs per-token loop")
    with _threads(1):
        _r = _compare({"per_token_loop": _loop, "grouped": _fast}, warmup=1, repeats=5)
print(f"{_n} tokens: {_r['per_token_loop']}; {_r['grouped']}; your grouped dispatch is "
      f"{_ratio(_r['per_token_loop'], _r['grouped']):.1f}x faster here (the grader times it itself and needs >= 10x)")

# %% [markdown]
# **Beyond this notebook.** `course_lib.deepseek.moe` is the production version of this layer.
# `python -m course_lib.deepseek.moe` times it at 64 experts, top-6 and 4096 tokens against a `torch.where` loop
# over experts (DeepSeek's own inference code does this) and against HF transformers' `DeepseekV3MoE`, whose
# outputs it matches on the same weights (`tests/test_moe.py`). With many tokens per expert all three spend
# their time in the same matrix products, so the grouped dispatch wins by little. The large win is over the
# per-token loop.
#
# ## Optional challenge (ungraded)
# 1. **Grouped GEMM.** Stack the expert weights into (E, I, d) tensors and replace the loop over experts with
#    `torch._grouped_mm` (offsets = `counts.cumsum(0)`). Compare it with your `dispatch` at 4 and at 4096 tokens.
# 2. **Device-limited routing.** Put 4 experts on each of 4 "devices" (groups) and count, per token, how many
#    devices its experts sit on, with and without the group limit. How does the group limit change the traffic?
# 3. **γ schedule.** V3 sets γ to 0 for the last 500B tokens. Train with γ = 0.01 and then γ = 0: does the load
#    stay balanced once the bias stops moving?

# %% [markdown]
# ### Worked challenge 1: grouped GEMM
# `dispatch` still loops over the experts: E small products per projection, each a separate kernel launch. A
# *grouped GEMM* does all of them in one call: stack the experts' weights into (E, d, I) and (E, I, d) tensors,
# sort the assignments' rows by expert, and pass the group ends (`offs` = the cumulative counts, int32) to
# `torch._grouped_mm(rows, W, offs=offs)`, which multiplies rows `offs[e-1]:offs[e]` by `W[e]`. It is a private
# API (present in torch 2.13, on CPU in float32 and bfloat16, forward only); where it is missing the solution
# falls back to a loop over the experts, so the answer stays the same. The cell below times it against your
# `dispatch` at 4 tokens, where launch overhead dominates, and at 4096, where the matrix products do.

# %% [solution id=ex_03_c1_grouped]
def stack_experts(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' weights stacked for a grouped GEMM: W1, W3 (E, dim, inter) and W2 (E, inter, dim)."""
    ### BEGIN SOLUTION
    def stack(weights: list[torch.Tensor]) -> torch.Tensor:  # E x (out, in) -> (E, in, out)
        return torch.stack([w.detach() for w in weights]).transpose(1, 2)
    return (stack([e.w1.weight for e in experts]), stack([e.w3.weight for e in experts]),
            stack([e.w2.weight for e in experts]))
    ### END SOLUTION


def grouped_dispatch(stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, weights: torch.Tensor,
                     indices: torch.Tensor) -> torch.Tensor:
    """dispatch's routed output (N, dim) with one grouped product per projection instead of a loop over experts."""
    ### BEGIN SOLUTION
    W1, W3, W2 = stacked
    N, K = indices.shape
    flat = indices.reshape(-1)  # (N*K,)
    perm = torch.argsort(flat, stable=True)  # assignments grouped by expert
    rows = perm // K  # (N*K,) their tokens
    ends = torch.bincount(flat, minlength=W1.shape[0]).cumsum(0)  # (E,) where each expert's rows end
    if hasattr(torch, "_grouped_mm") and x.dtype in (torch.float32, torch.bfloat16):
        def mm(a, w):
            return torch._grouped_mm(a, w, offs=ends.to(torch.int32))
    else:  # the fallback: one product per expert on its slice
        def mm(a, w):
            starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
            return torch.cat([a[s:t] @ w[e] for e, (s, t) in enumerate(zip(starts, ends.tolist()))])
    with torch.no_grad():
        xs = x[rows]  # (N*K, dim)
        h = F.silu(mm(xs, W1)) * mm(xs, W3)  # (N*K, inter)
        out = mm(h, W2) * weights.reshape(-1)[perm].to(x.dtype).unsqueeze(-1)  # (N*K, dim)
        return torch.zeros_like(x).index_add_(0, rows, out)
    ### END SOLUTION


# %% [code]
cfg_gg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=0, n_activated_experts=4,
                   n_expert_groups=4, n_limited_groups=2)
torch.manual_seed(0)
try:
    moe_gg = MixtureOfExperts(cfg_gg).eval()
    stacked_gg = stack_experts(moe_gg.experts)
    print(f"torch._grouped_mm {'is' if hasattr(torch, '_grouped_mm') else 'is NOT'} available (torch {torch.__version__})")
    for n_tok in (4, 4096):
        x_gg = torch.randn(n_tok, cfg_gg.dim)
        with torch.no_grad():
            w_gg, i_gg, _ = moe_gg.gate(x_gg)
            y_loop = moe_gg.dispatch(x_gg, w_gg, i_gg)
        y_grouped = grouped_dispatch(stacked_gg, x_gg, w_gg, i_gg)
        print(f"{n_tok} tokens: largest difference from your dispatch {(y_grouped - y_loop).abs().max():.1e}")
        with threads(1), torch.no_grad():
            args_gg = (x_gg, w_gg, i_gg)
            t_gg = compare({"dispatch (a loop over experts)": lambda a=args_gg: moe_gg.dispatch(*a),
                            "grouped GEMM": lambda a=args_gg: grouped_dispatch(stacked_gg, *a)},
                           warmup=1, repeats=5, number=3 if n_tok == 4 else 1)
        a, b = t_gg.values()
        print(f"  {a}\n  {b}\n  the grouped GEMM is {ratio(a, b):.2f}x as fast")
except NotImplementedError:
    print("(optional: finish 3.3 and write stack_experts and grouped_dispatch above to compare them)")

# %% [markdown]
# ### Worked challenge 2: device-limited routing
# Count, per token, how many groups ("devices") its chosen experts sit on, with the group limit and without it
# (the same router weights, `n_limited_groups` = 4 of 4). Your answer goes in the cell below; the worked solutions
# hold one.

# %% [solution id=ex_03_c2_devices]
def devices_per_token(router: ExpertRouter, x: torch.Tensor) -> torch.Tensor:
    """(N,) int64: how many of the router's groups the experts chosen for each token x (N, dim) belong to."""
    ### BEGIN SOLUTION
    with torch.no_grad():
        _, idx, _ = router(x)  # (N, K)
    per_group = router.cfg.n_routed_experts // router.cfg.n_expert_groups
    on = torch.zeros(idx.shape[0], router.cfg.n_expert_groups, dtype=torch.bool)  # (N, G)
    return on.scatter_(1, idx // per_group, True).sum(dim=-1)  # (N,)
    ### END SOLUTION


# %% [code]
cfg_dev = MoEConfig(dim=32, moe_inter_dim=8, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
torch.manual_seed(0)
x_dev = torch.randn(2048, cfg_dev.dim)
try:
    r_lim = ExpertRouter(cfg_dev)
    r_free = ExpertRouter(dataclasses.replace(cfg_dev, n_limited_groups=cfg_dev.n_expert_groups))
    r_free.load_state_dict(r_lim.state_dict())  # the same centroids: only the group limit differs
    lim, free = devices_per_token(r_lim, x_dev), devices_per_token(r_free, x_dev)
    for name, d in (("group limit, 2 of 4 groups", lim), ("no group limit", free)):
        shares = torch.bincount(d, minlength=cfg_dev.n_expert_groups + 1)[1:].float() / len(d)
        print(f"{name:26s}: {d.float().mean():.2f} devices per token on average; share with 1..4 devices "
              f"{[round(v, 2) for v in shares.tolist()]}")
except NotImplementedError:
    print("(optional: finish 3.2 and write devices_per_token above to compare the traffic)")

# %% [markdown]
# ### Worked challenge 3: the γ schedule
# DeepSeek-V3 moves the bias with γ = 0.001 for most of its training and freezes it (γ = 0) for the last 500B
# tokens. Here: train the experiments' layer (3.5) with γ = 0.01 for the first half of its steps, then go on with
# γ = 0, and compare MaxVio with the unbalanced run `runs["none"]` from 3.5 (same initial weights). Once the bias
# has found prices that balance the load, does the load stay balanced without it moving, or does it drift back
# towards the unbalanced run's? Your answer goes in the cell below.

# %% [solution id=ex_03_c3_gamma]
def gamma_schedule(model: MixtureOfExperts, steps_on: int, steps_off: int, gamma: float) -> tuple[dict, dict]:
    """Train ``model`` with the bias update at ``gamma`` for ``steps_on`` steps, then with gamma 0 for ``steps_off``:
    the two phases' histories from ``train``."""
    ### BEGIN SOLUTION
    on = train(model, steps=steps_on, mode="bias", gamma=gamma, seed=0)
    off = train(model, steps=steps_off, mode="bias", gamma=0.0, seed=1)  # fresh batches, the bias frozen
    return on, off
    ### END SOLUTION


# %% [code]
try:
    torch.manual_seed(0)  # the experiments' initial weights
    half = STEPS // 2
    h_on, h_off = gamma_schedule(MixtureOfExperts(EXP), half, STEPS - half, 0.01)
    h_none = runs["none"]  # 3.5's unbalanced run, STEPS steps
    for name, v in ((f"gamma 0.01, the last 20 of {half} steps", h_on["maxvio"][-20:]),
                    (f"gamma 0 after it, the last 20 of {STEPS} steps", h_off["maxvio"][-20:]),
                    (f"no balancing, the last 20 of {STEPS} steps", h_none["maxvio"][-20:])):
        print(f"{name:40s}: MaxVio {np.mean(v):.2f}")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(smooth(h_on["maxvio"] + h_off["maxvio"]), label="gamma 0.01, then 0")
    ax.plot(smooth(h_none["maxvio"]), label="no balancing")
    ax.axvline(len(h_on["maxvio"]), color="grey", ls="--", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio (5-step mean)")
    ax.set_title(f"Freezing the bias after {half} steps")
    ax.legend()
    fig.tight_layout()
    plt.show()
except (NotImplementedError, KeyError):
    print("(optional: finish 3.3 and 3.4, run 3.5, and write gamma_schedule above to see the schedule)")

# %% [markdown]
# In this toy the load does not stay balanced: the router's weights still move fast (a learning rate of 3e-3,
# a few dozen steps in), and with the bias frozen nothing pulls the busy experts back, so MaxVio climbs towards
# the unbalanced run's. V3 froze its bias only after 14.3T tokens, when routing had settled; a schedule like
# that assumes a router that has stopped changing much, which is worth checking (MaxVio) before trusting it.

# %% [markdown]
# ## Quiz
# Set each answer to one letter, e.g. `ANSWER_Q1 = "a"`.
#
# **Q1.** In DeepSeek-V3, the expert bias $b_i$ changes (a) the combine weights only; (b) which experts are
# selected, but not the combine weights; (c) both the selection and the weights; (d) the gate's gradient.
#
# **Q2.** DeepSeek-V3 routes among 256 experts in 8 groups, keeps 4 groups and activates 8 experts. Among how
# many experts does a token's top-8 choose? (a) 256; (b) 32; (c) 128; (d) 8.
#
# **Q3.** Why are the experts of dropped groups masked with $-\infty$ rather than 0?
# (a) biased scores $s + b$ can be negative, so a masked 0 would outrank kept experts and route tokens outside their kept groups;
# (b) $-\infty$ is faster to compute;
# (c) sigmoid scores can exceed 1;
# (d) a 0 would break the renormalisation of the weights.
#
# **Q4.** After a training step, expert 7's load is 3x the mean. With γ = 0.001, its bias changes by
# (a) −0.003; (b) +0.001; (c) −0.002; (d) −0.001.

# %% [solution id=quiz_03_answers]
### BEGIN SOLUTION
ANSWER_Q1 = "b"
ANSWER_Q2 = "c"
ANSWER_Q3 = "a"
ANSWER_Q4 = "d"
### END SOLUTION

# %% [test id=test_03_quiz points=4]
# Checks you can run now. When graded, the judge runs these and more (4 points): each answer is one letter; 1 point per correct answer.
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [given id=feedback_03_quiz]
#@quiz-feedback

# %% [markdown]
# ## Summary
# - A DeepSeekMoE layer = shared expert(s) on every token + $K_r$ of $N_r$ fine-grained SwiGLU experts. V3: 1 + 8 of
#   256, width 2048; 11.3 B parameters per layer, 0.40 B active per token.
# - Router: $s = \sigma(W u)$; select with $s + b$; group score = sum of the top-2 selection scores; keep $M$ groups,
#   mask the rest with $-\infty$; top-$K_r$; weights $= 2.5 \cdot s / \sum_{\text{TopK}} s$, from the *unbiased* $s$.
# - Dispatch: stable `argsort` of the assignments by expert, `bincount`, one call per expert on a contiguous slice,
#   `index_add_` back. Never loop over tokens.
# - Balancing: $b_i \mathrel{+}= \gamma\,\mathrm{sign}(\overline{\text{load}} - \text{load}_i)$ after each step, no gradient; a
#   tiny sequence-wise loss $\alpha \sum_i f_i P_i$ as a backstop; MaxVio to measure. V3 drops no tokens.
#
# ## Troubleshooting
# | symptom | likely cause | fix |
# |---|---|---|
# | `NotImplementedError: exercise not implemented yet` | a stub is still in place | replace the `raise` line in that method |
# | weights do not sum to 2.5 | not renormalised, or `route_scale` forgotten | divide the chosen $s$ by their sum, then multiply by `route_scale` |
# | "bias in weights" | gathered the weights from `s + b` | gather from the unbiased `scores` |
# | tokens routed outside their kept groups | masked with 0 (or a large negative number that biased scores can undercut) | mask dropped groups with $-\infty$, which no biased score can undercut |
# | wrong groups kept | group score = max | a group's score is the sum of its two largest selection scores |
# | `RuntimeError: split_with_sizes expects split_sizes to sum exactly to ...` | counts taken before dropping masked assignments | `bincount` the *kept* sorted assignments |
# | output right for one token, wrong for others | `order // K` vs `order % K` mixed up, or the weights not permuted with `order` | assignment $j$ of the flattened (N, K) layout belongs to token $j$ div $K$; permute the weights with the same order as the assignments |
# | "expert e was called n times" | a loop over tokens, or over (token, slot) pairs | one call per expert on its contiguous slice |
# | MaxVio grows with the bias update on | sign flipped | `sign(mean - load)`: overloaded experts go *down* |
# | benchmark speedup ≈ 1x | per-token loop inside `dispatch` | sort once, slice per expert |
#
# **Next:** Section 4 takes the expert GEMMs to FP8. Section 5 puts `course_lib.deepseek.moe.MoE` (the reference
# version of your layer) after MLA in every block, with the bias updated once per training step.

# %% [markdown]
# ## Keep your parts
# The answer cells that start with `#@save` (your expert and layer counter, router, MoE layer and balancing functions) are yours to keep. Run the cell below after your last
# change: it writes the latest version of each into `my_deepseek/s03_moe.py` beside your notebooks, and Section 5
# builds on them. Where a part is missing or fails a quick check, Section 5 says so in one line and uses the
# course's version (it always does while grading, so each section is graded on its own).

# %% [given]
from course_lib.learner import save_my_parts

my_parts_file = save_my_parts("03_moe", header="""
import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deepseek.routing import MoEConfig, RoutingInfo, dispatch_per_token, expert_capacity, expert_load
""")
