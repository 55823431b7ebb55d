"""DeepSeekMoE: sigmoid router with a selection-only bias, group-limited top-k, shared + routed experts.

Equations (DeepSeek-V3 report, arXiv 2412.19437, section 2.1.2; DeepSeek-V2, arXiv 2405.04434):

- affinity      ``s_{i,t} = sigmoid(u_t . e_i)``                        V3 eq. (15); V2 used softmax
- selection     ``s_{i,t} + b_i`` picks the top ``K_r`` experts          V3 eq. (16); ``b`` never enters the weights
- group limit   a group's score is the sum of its two best biased scores; only the best
                ``n_limited_groups`` groups stay candidates (the rest are masked with -inf)
- weights       ``g_{i,t} = s_{i,t} / sum_{j in TopK} s_{j,t}`` times ``route_scale`` (2.5 in V3)   eq. (13)
- output        ``h'_t = u_t + sum_shared FFN^(s)(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t)``             eq. (12)
                (the residual ``u_t +`` lives in the transformer block, not here)
- balancing     auxiliary-loss-free bias update ``b_i += gamma * sign(mean_load - load_i)``; the
                complementary sequence-wise loss ``L = alpha * sum_i f_i P_i``           eqs. (17)-(20)
- imbalance     ``MaxVio = max_i load_i / mean_load - 1`` (Wang et al. 2024)

Dispatch is vectorised: the ``N*K`` (token, expert) assignments are sorted by expert once (stable
``argsort``, ``bincount``), each expert gathers the rows of its contiguous slice and runs one matmul chain
on them (a loop over *experts*, never over tokens), and the weighted results are scattered back with
``index_add_``. ``dispatch_per_expert`` (the
``torch.where``-per-expert loop of DeepSeek's inference code and HF's eager path) and
``dispatch_per_token`` are kept as baselines and oracles.

The parts Section 3's notebook is given (``MoEConfig``, ``RoutingInfo``, ``expert_load``,
``expert_capacity``, ``dispatch_per_token``) live in ``course_lib.deepseek.routing``, which holds no
answer of that section, and are re-exported here; ``param_counts(cfg)`` (exercise 3.1's answer) is here.

Parameter names and HF transformers
-----------------------------------
Names follow DeepSeek's own code (``w1``/``w2``/``w3`` of ``course_lib.deepseek.common.SwiGLU``):

===================================  ==================================================  ==========================
this module                          HF hub checkpoint (``model.layers.L.mlp.`` prefix)   HF transformers >= 5 module
===================================  ==================================================  ==========================
``gate.weight`` (E, dim)             ``gate.weight``                                     ``gate.weight``
``gate.bias`` (E,) fp32 buffer       ``gate.e_score_correction_bias``                    ``gate.e_score_correction_bias``
``experts.{i}.w1.weight`` (I, dim)   ``experts.{i}.gate_proj.weight``                    ``experts.gate_up_proj[i, :I]``
``experts.{i}.w3.weight`` (I, dim)   ``experts.{i}.up_proj.weight``                      ``experts.gate_up_proj[i, I:]``
``experts.{i}.w2.weight`` (dim, I)   ``experts.{i}.down_proj.weight``                    ``experts.down_proj[i]``
``shared_experts.w1/w3/w2.weight``   ``shared_experts.gate_proj/up_proj/down_proj.weight`` same as the checkpoint
===================================  ==================================================  ==========================

``to_hf_checkpoint``/``from_hf_checkpoint`` rename state dicts; ``load_into_hf``/``load_from_hf``
copy weights into and out of a ``transformers`` ``DeepseekV3MoE`` (which stacks the experts).

Where HF's ``DeepseekV3MoE`` differs on purpose:

- Group masking value. DeepSeek's inference code and transformers 5.x fill the experts of dropped groups
  with ``-inf``. transformers 4.x filled them with ``0.0``: once a biased score ``s + b`` is negative,
  a masked expert (score 0) beats it and the token is routed *outside* its kept groups.
  ``MoEConfig.group_mask_fill=0.0`` reproduces that behaviour for comparison.
- Group score without a bias. DeepSeek's code uses the group's *max* score when the gate has no bias
  (V2-style softmax routing); HF always uses the top-2 sum. Here ``score_func="softmax"`` means V2
  style: no bias, group max, and no renormalisation of the top-k weights (as DeepSeek's code).
- HF's router always runs in float32 (this one in float32 or wider, so float64 tests stay exact) and
  adds 1e-20 to the renormalisation denominator. HF has no bias update, balance loss or capacity.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deepseek.common import SwiGLU
from course_lib.deepseek.routing import MoEConfig, RoutingInfo, dispatch_per_token, expert_capacity, expert_load, max_violation

__all__ = [
    "stack_experts",
    "dispatch_grouped",
    "MoEConfig",
    "RoutingInfo",
    "param_counts",
    "Gate",
    "Expert",
    "MoE",
    "route",
    "expert_load",
    "max_violation",
    "bias_update",
    "sequence_balance_loss",
    "expert_capacity",
    "dispatch_sorted",
    "dispatch_per_expert",
    "dispatch_per_token",
    "HF_EXPERT_NAMES",
    "hf_config",
    "to_hf_checkpoint",
    "from_hf_checkpoint",
    "load_into_hf",
    "load_from_hf",
    "bench_moe",
]

Expert = SwiGLU
"""A routed or shared expert: ``w2(silu(w1 x) * w3 x)``, DeepSeek-V3's SwiGLU FFN."""


def param_counts(cfg: MoEConfig) -> dict[str, int]:
    """Total and per-token active parameters of the layer (gate + shared + routed experts)."""
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    gate = cfg.n_routed_experts * cfg.dim
    shared = cfg.n_shared_experts * per_expert
    return {
        "total": gate + shared + cfg.n_routed_experts * per_expert,
        "active": gate + shared + cfg.n_activated_experts * per_expert,
    }


# ---------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------


def route(
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_groups: int = 1,
    n_limited_groups: int = 1,
    route_scale: float = 1.0,
    renormalize: bool = True,
    group_mask_fill: float = float("-inf"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts from affinities ``scores`` (N, E); return combine ``weights`` (N, K) and ``indices`` (N, K).

    Selection uses ``scores + bias``; a group's score is the sum of its top-2 biased scores (its max when
    ``bias`` is None, V2 style); experts outside the best ``n_limited_groups`` groups get
    ``group_mask_fill``. Weights gather the *unbiased* scores, renormalised (V3 eq. 13), times ``route_scale``.
    """
    N, E = scores.shape
    choice = scores if bias is None else scores + bias.to(scores.dtype)  # (N, E) selection scores only
    if n_groups > 1:
        grouped = choice.view(N, n_groups, E // n_groups)  # (N, G, E/G)
        if bias is None:
            group_scores = grouped.amax(dim=-1)  # (N, G)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
        keep = group_scores.topk(n_limited_groups, dim=-1).indices  # (N, n_limited_groups)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), group_mask_fill).flatten(1)  # (N, E)
    indices = choice.topk(top_k, dim=-1).indices  # (N, K)
    weights = scores.gather(1, indices)  # (N, K) unbiased: the bias never reaches the weights
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


class Gate(nn.Module):
    """The router: affinities, selection bias, group-limited top-k (DeepSeek-V3 eqs. 13-16).

    ``weight`` (E, dim) is learned; ``bias`` (E,) is a float32 buffer moved by ``update_bias``, never by
    gradients, and only affects which experts are chosen.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def affinities(self, x: torch.Tensor) -> torch.Tensor:
        """``s = sigmoid(x W^T)`` (or softmax for V2 style), computed in float32 or wider; x: (N, dim) -> (N, E)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
        return logits.sigmoid() if self.cfg.score_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, dim) -> weights (N, K), indices (N, K), scores (N, E)."""
        cfg = self.cfg
        scores = self.affinities(x)  # (N, E)
        v3 = cfg.score_func == "sigmoid"
        weights, indices = route(
            scores,
            self.bias if v3 else None,
            top_k=cfg.n_activated_experts,
            n_groups=cfg.n_expert_groups,
            n_limited_groups=cfg.n_limited_groups,
            route_scale=cfg.route_scale,
            renormalize=v3,
            group_mask_fill=cfg.group_mask_fill,
        )
        return weights, indices, scores

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: ``b_i += gamma * sign(mean_load - load_i)``; returns the change."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        delta = bias_update(load, gamma)
        self.bias += delta
        return delta


def bias_update(load: torch.Tensor, gamma: float) -> torch.Tensor:
    """``gamma * sign(mean_load - load_i)``: overloaded experts go down, underloaded ones up."""
    load = load.to(torch.float32)
    return gamma * torch.sign(load.mean() - load)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float, *, normalize: bool = True) -> torch.Tensor:
    """Complementary sequence-wise balance loss, DeepSeek-V3 eqs. (17)-(20), averaged over sequences.

    ``scores``: (B, T, E) or (T, E) unbiased affinities; ``indices``: (B, T, K) or (T, K) chosen experts.
    ``f_i = E / (K T) * #{t: i chosen}``, ``P_i = mean_t s'_{i,t}`` with ``s' = s / sum_j s_j``
    (``normalize=False`` for scores that already sum to 1), ``L = alpha * sum_i f_i P_i``.
    """
    if scores.dim() == 2:
        scores, indices = scores.unsqueeze(0), indices.unsqueeze(0)
    B, T, E = scores.shape
    K = indices.shape[-1]
    s_norm = scores / scores.sum(dim=-1, keepdim=True) if normalize else scores  # (B, T, E)
    P = s_norm.mean(dim=1)  # (B, E)
    hits = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
    hits.scatter_add_(1, indices.reshape(B, T * K), torch.ones(B, T * K, dtype=scores.dtype, device=scores.device))
    f = hits * (E / (K * T))  # (B, E)
    return alpha * (f * P).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------------
# Dispatch: vectorised, and the two loop baselines
# ---------------------------------------------------------------------------------------------------

ExpertFn = Callable[[torch.Tensor], torch.Tensor]


def dispatch_sorted(
    experts: Sequence[ExpertFn],
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    capacity: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y_t = sum_k weights[t,k] * experts[indices[t,k]](x_t)``, grouped by expert (no loop over tokens).

    x: (N, D); weights, indices: (N, K). With ``capacity``, an expert serves at most that many
    assignments, first come (lowest token index) first served; the rest are dropped (contribute 0) and
    the returned ``kept`` mask (N, K) says which survived.
    """
    N, K = indices.shape
    E = len(experts)
    flat = indices.reshape(-1)  # (N*K,) expert of each assignment, token-major
    order = torch.argsort(flat, stable=True)  # (N*K,) assignments grouped by expert, token order kept
    counts = torch.bincount(flat, minlength=E)  # (E,)
    kept = None
    if capacity is not None:
        starts = counts.cumsum(0) - counts  # (E,) first slot of each expert in ``order``
        rank = torch.arange(order.numel(), device=x.device) - starts[flat[order]]  # (N*K,) place in its queue
        keep_sorted = rank < capacity  # (N*K,)
        kept = torch.zeros(N * K, dtype=torch.bool, device=x.device)
        kept[order[keep_sorted]] = True
        kept = kept.view(N, K)
        order = order[keep_sorted]
        counts = counts.clamp(max=capacity)
    token = order // K  # (S,) token served by each sorted assignment
    w_sorted = weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)  # (S, 1)
    y = torch.zeros_like(x)  # (N, D)
    # One slice of the sorted assignments per expert. Gathering and scattering per slice keeps the working
    # set in cache; one gather of all N*K rows up front measured ~1.4x slower at N=4096, K=6, D=256.
    sizes = counts.tolist()
    for e, (tok_e, w_e) in enumerate(zip(token.split(sizes), w_sorted.split(sizes))):
        if tok_e.numel():
            y.index_add_(0, tok_e, experts[e](x[tok_e]) * w_e)  # (n_e, D) rows added to their tokens
    return y, kept


def dispatch_per_expert(experts: Sequence[ExpertFn], x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Baseline: for each expert, find its tokens with ``torch.where`` (DeepSeek's code, HF's eager path)."""
    y = torch.zeros_like(x)
    counts = torch.bincount(indices.reshape(-1), minlength=len(experts)).tolist()
    for e, expert in enumerate(experts):
        if counts[e] == 0:
            continue
        token, slot = torch.where(indices == e)  # (n_e,) each
        y.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
    return y


def stack_experts(experts: Sequence[SwiGLU]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed experts' weights stacked for ``dispatch_grouped``: ``(w1, w3, w2)`` as (E, dim, inter),
    (E, dim, inter), (E, inter, dim) views of contiguous stacks (build once, not per call)."""
    w1 = torch.stack([e.w1.weight.detach() for e in experts]).transpose(1, 2)
    w3 = torch.stack([e.w3.weight.detach() for e in experts]).transpose(1, 2)
    w2 = torch.stack([e.w2.weight.detach() for e in experts]).transpose(1, 2)
    return w1, w3, w2


def dispatch_grouped(stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, weights: torch.Tensor,
                     indices: torch.Tensor) -> torch.Tensor:
    """``dispatch_sorted`` without its loop over experts: each of the three expert GEMMs is one
    ``torch._grouped_mm`` over the assignments sorted by expert (``stacked`` from ``stack_experts``).

    Needs a torch with ``_grouped_mm`` (CUDA: bf16 on Hopper and newer) and 16-byte aligned rows.
    """
    w1, w3, w2 = stacked
    E = w1.shape[0]
    flat = indices.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)  # (E,) end of each expert's group
    token = order // indices.shape[1]  # (S,)
    xs = x[token]  # (S, dim)
    h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)  # (S, inter)
    out = torch._grouped_mm(h, w2, offs=offs) * weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)  # (S, dim)
    return torch.zeros_like(x).index_add_(0, token, out)


# ---------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------


class MoE(nn.Module):
    """DeepSeekMoE layer: ``shared_experts(x) + sum_k g_k expert_k(x)`` (DeepSeek-V3 eq. 12, without the residual).

    ``forward(x)`` takes (B, T, dim) or (N, dim) and returns ``(y, info)``: ``y`` has x's shape,
    ``info`` is a ``RoutingInfo`` (load, weights, indices, scores, and in training the sequence-wise
    balance loss times ``seq_aux_alpha``; add ``info.aux_loss`` to the task loss). After each optimizer
    step call ``update_bias(info.load)`` (summed over micro-batches) for auxiliary-loss-free balancing.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        # DeepSeek fuses the shared experts into one MLP of width n_shared * moe_inter_dim.
        self.shared_experts = Expert(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        cfg = self.cfg
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.dim:
            raise ValueError(f"MoE expects x of shape (B, T, {cfg.dim}) or (N, {cfg.dim}), got {tuple(x.shape)}")
        h = x.reshape(-1, cfg.dim)  # (N, dim)
        weights, indices, scores = self.gate(h)  # (N, K), (N, K), (N, E)
        capacity = None
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(h.shape[0], cfg.n_activated_experts, cfg.n_routed_experts, cfg.capacity_factor)
        y, kept = dispatch_sorted(self.experts, h, weights, indices, capacity)  # (N, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        info = RoutingInfo(weights=weights, indices=indices, scores=scores, load=expert_load(indices, cfg.n_routed_experts),
                           kept=kept)
        if self.training and cfg.seq_aux_alpha > 0 and h.shape[0] > 0:
            T = x.shape[1] if x.dim() == 3 else h.shape[0]
            info.aux_loss = sequence_balance_loss(scores.view(-1, T, cfg.n_routed_experts), indices.view(-1, T, cfg.n_activated_experts),
                                                  cfg.seq_aux_alpha, normalize=cfg.score_func == "sigmoid")
        return y.view(x.shape), info

    def update_bias(self, load: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        return self.gate.update_bias(load, gamma)

    def routed(self, h: torch.Tensor, impl: Literal["sorted", "per_expert", "per_token"] = "sorted") -> torch.Tensor:
        """Routed-expert output only, for h (N, dim), with a chosen dispatch (benchmarks, tests)."""
        weights, indices, _ = self.gate(h)
        if impl == "sorted":
            return dispatch_sorted(self.experts, h, weights, indices)[0]
        if impl == "per_expert":
            return dispatch_per_expert(self.experts, h, weights, indices)
        return dispatch_per_token(self.experts, h, weights, indices)


# ---------------------------------------------------------------------------------------------------
# HF transformers interop
# ---------------------------------------------------------------------------------------------------

HF_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_config(cfg: MoEConfig, experts_implementation: str = "eager", **overrides):
    """A ``transformers.DeepseekV3Config`` whose ``DeepseekV3MoE`` matches ``cfg`` (sigmoid routing only)."""
    from transformers import DeepseekV3Config

    if cfg.score_func != "sigmoid":
        raise ValueError("HF's DeepseekV3MoE only implements sigmoid routing")
    kw = dict(hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_inter_dim, n_routed_experts=cfg.n_routed_experts,
              n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts, n_group=cfg.n_expert_groups,
              topk_group=cfg.n_limited_groups, routed_scaling_factor=cfg.route_scale, norm_topk_prob=True, hidden_act="silu",
              experts_implementation=experts_implementation)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def _rename(name: str, table: dict[str, str]) -> str:
    parts = name.split(".")
    return ".".join(table.get(p, p) for p in parts)


def to_hf_checkpoint(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename an ``MoE`` state dict to HF hub checkpoint names (per-expert tensors), under ``prefix``."""
    out = {}
    for k, v in state.items():
        k = "gate.e_score_correction_bias" if k == "gate.bias" else _rename(k, HF_EXPERT_NAMES)
        out[prefix + k] = v
    return out


def from_hf_checkpoint(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_checkpoint``: keys under ``prefix`` become ``MoE`` state-dict names."""
    back = {v: k for k, v in HF_EXPERT_NAMES.items()}
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        k = "gate.bias" if k == "gate.e_score_correction_bias" else _rename(k, back)
        out[k] = v
    return out


@torch.no_grad()
def load_into_hf(moe: MoE, hf_moe: nn.Module) -> None:
    """Copy ``moe``'s weights into a transformers>=5 ``DeepseekV3MoE`` (stacked ``gate_up_proj``/``down_proj``)."""
    hf_moe.gate.weight.copy_(moe.gate.weight)
    hf_moe.gate.e_score_correction_bias.copy_(moe.gate.bias)
    w1 = torch.stack([e.w1.weight for e in moe.experts])  # (E, I, dim)
    w3 = torch.stack([e.w3.weight for e in moe.experts])  # (E, I, dim)
    hf_moe.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))  # (E, 2I, dim), gate first
    hf_moe.experts.down_proj.copy_(torch.stack([e.w2.weight for e in moe.experts]))  # (E, dim, I)
    if moe.shared_experts is not None:
        for ours, theirs in HF_EXPERT_NAMES.items():
            getattr(hf_moe.shared_experts, theirs).weight.copy_(getattr(moe.shared_experts, ours).weight)


@torch.no_grad()
def load_from_hf(moe: MoE, hf_moe: nn.Module) -> None:
    """Copy a transformers>=5 ``DeepseekV3MoE``'s weights into ``moe`` (inverse of ``load_into_hf``)."""
    I = moe.cfg.moe_inter_dim
    moe.gate.weight.copy_(hf_moe.gate.weight)
    moe.gate.bias.copy_(hf_moe.gate.e_score_correction_bias)
    for i, e in enumerate(moe.experts):
        gate_up = hf_moe.experts.gate_up_proj[i]  # (2I, dim)
        e.w1.weight.copy_(gate_up[:I])
        e.w3.weight.copy_(gate_up[I:])
        e.w2.weight.copy_(hf_moe.experts.down_proj[i])
    if moe.shared_experts is not None:
        for ours, theirs in HF_EXPERT_NAMES.items():
            getattr(moe.shared_experts, ours).weight.copy_(getattr(hf_moe.shared_experts, theirs).weight)


# ---------------------------------------------------------------------------------------------------
# Benchmark (``make bench``)
# ---------------------------------------------------------------------------------------------------


def bench_moe(
    n_tokens: int = 4096,
    n_experts: int = 64,
    top_k: int = 6,
    dim: int = 256,
    inter_dim: int = 128,
    n_groups: int = 8,
    n_limited_groups: int = 4,
    *,
    repeats: int = 7,
    per_token: bool = True,
    hf: bool = True,
    threads: int | None = 1,
    seed: int = 0,
) -> dict:
    """Time the routed-expert dispatch: vectorised vs per-expert loop vs per-token loop vs HF's DeepseekV3MoE.

    Every candidate runs the full layer (gate, routed experts, shared expert) on the same weights and
    inputs, interleaved (``course_lib.bench.compare``); outputs must agree before any ratio is reported.
    ``threads`` defaults to 1: on a shared 2-core machine two intra-op threads amplify contention.
    Returns medians, ratios ("x faster than vectorised") and max abs differences.
    """
    from course_lib.bench import compare, ratio
    from course_lib.bench import threads as pin_threads

    torch.manual_seed(seed)
    cfg = MoEConfig(dim=dim, moe_inter_dim=inter_dim, n_routed_experts=n_experts, n_shared_experts=1, n_activated_experts=top_k,
                    n_expert_groups=n_groups, n_limited_groups=n_limited_groups, seq_aux_alpha=0.0)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.gate.bias.normal_(0.0, 0.01)
    x = torch.randn(n_tokens, dim)

    def layer(impl: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            return moe.routed(x, impl) + moe.shared_experts(x)

        return run

    fns: dict[str, Callable[[], torch.Tensor]] = {"vectorised": layer("sorted"), "per_expert_loop": layer("per_expert")}
    if hf:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        for impl in ("eager", "grouped_mm"):
            m = DeepseekV3MoE(hf_config(cfg, experts_implementation=impl)).eval()
            load_into_hf(moe, m)
            fns[f"hf_{impl}"] = functools.partial(m.__call__, x)
    result: dict = {"config": {"n_tokens": n_tokens, "n_experts": n_experts, "top_k": top_k, "dim": dim, "inter_dim": inter_dim,
                               "n_groups": n_groups, "n_limited_groups": n_limited_groups}, "threads": None}
    with torch.inference_mode(), pin_threads(threads or torch.get_num_threads()):
        result["threads"] = torch.get_num_threads()
        ref = fns["vectorised"]()
        diffs = {k: float((f() - ref).abs().max()) for k, f in fns.items() if k != "vectorised"}
        timings = compare(fns, warmup=1, repeats=repeats)
        if per_token:
            diffs["per_token_loop"] = float((layer("per_token")() - ref).abs().max())
            t2 = compare({"vectorised": fns["vectorised"], "per_token_loop": layer("per_token")}, warmup=0, repeats=3)
            timings["per_token_loop"] = t2["per_token_loop"]
            result["per_token_ratio"] = ratio(t2["per_token_loop"], t2["vectorised"])
    scale = float(ref.abs().max())
    result["max_abs_diff"] = diffs
    result["agree"] = all(d <= 1e-4 * max(scale, 1.0) for d in diffs.values())
    result["median_s"] = {k: t.median for k, t in timings.items()}
    result["spread"] = {k: t.spread for k, t in timings.items()}
    result["speedup_of_vectorised"] = {k: ratio(t, timings["vectorised"]) for k, t in timings.items() if k != "vectorised"}
    if per_token:
        result["speedup_of_vectorised"]["per_token_loop"] = result.pop("per_token_ratio")
    return result


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Benchmark DeepSeekMoE dispatch (vectorised vs loops vs HF).")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--inter-dim", type=int, default=128)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--limited-groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-per-token", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ns = ap.parse_args(argv)
    r = bench_moe(ns.tokens, ns.experts, ns.top_k, ns.dim, ns.inter_dim, ns.groups, ns.limited_groups, repeats=ns.repeats,
                  per_token=not ns.no_per_token, hf=not ns.no_hf, threads=ns.threads)
    print(f"DeepSeekMoE dispatch, {r['config']}, {r['threads']} threads; outputs agree: {r['agree']}")
    for k, s in r["median_s"].items():
        sp = r["speedup_of_vectorised"].get(k)
        extra = f"  vectorised is {sp:.2f}x faster" if sp else ""
        diff = r["max_abs_diff"].get(k)
        extra += f"  (max abs diff {diff:.2e})" if diff is not None else ""
        print(f"  {k:16s} {1e3 * s:9.2f} ms  +-{100 * r['spread'][k]:.0f}%{extra}")


if __name__ == "__main__":
    _main()
