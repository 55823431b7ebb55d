"""The given parts of DeepSeekMoE: the layer's configuration, what a forward reports, and two helpers.

Section 3's notebook builds the router and the layer itself (``course_lib.deepseek.moe`` holds the
course's reference versions, which grade it); what it is *given* lives here, so a grading kernel can
import these without the answers:

- ``MoEConfig``: sizes and routing hyper-parameters (field names follow DeepSeek's ``ModelArgs``);
- ``RoutingInfo``: what one MoE forward decided (weights, indices, scores, load, kept mask);
- ``expert_load(indices, E)``: assignments per expert, float32 (a ``bincount``);
- ``max_violation(load)``: MaxVio, ``max load / mean load - 1`` (Section 1.3's exercise, given from Section 3 on);
- ``expert_capacity(N, K, E, c)``: ``ceil(c * N * K / E)`` slots per expert (GShard / Switch);
- ``dispatch_per_token``: the obviously-right, slow per-token loop the benchmark compares against.

``course_lib.deepseek.moe`` re-exports all of them, so its importers need not know about this split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from course_lib.deepseek.v3 import preset

__all__ = ["MoEConfig", "RoutingInfo", "expert_load", "max_violation", "expert_capacity", "dispatch_per_token"]


@dataclass
class MoEConfig:
    """Sizes and routing hyper-parameters of one DeepSeekMoE layer (defaults: a small V3-shaped layer).

    Field names follow DeepSeek's ``ModelArgs``; ``n_limited_groups`` is HF's ``topk_group``.
    """

    dim: int = 64
    moe_inter_dim: int = 32
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    n_activated_experts: int = 4
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    route_scale: float = 2.5
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    bias_update_speed: float = 1e-3
    seq_aux_alpha: float = 1e-4
    capacity_factor: float | None = None
    group_mask_fill: float = float("-inf")

    def __post_init__(self) -> None:
        E, G = self.n_routed_experts, self.n_expert_groups
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if E % G:
            raise ValueError(f"n_routed_experts ({E}) must be divisible by n_expert_groups ({G})")
        if not 1 <= self.n_limited_groups <= G:
            raise ValueError(f"n_limited_groups must be in [1, {G}], got {self.n_limited_groups}")
        if G > 1 and self.score_func == "sigmoid" and E // G < 2:
            raise ValueError("group scores sum each group's top-2 experts: need at least 2 experts per group")
        if not 1 <= self.n_activated_experts <= self.n_limited_groups * (E // G):
            raise ValueError(
                f"n_activated_experts ({self.n_activated_experts}) must be between 1 and the "
                f"{self.n_limited_groups * (E // G)} experts in the kept groups"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")

    @classmethod
    def deepseek_v3(cls) -> MoEConfig:
        """The 671B model's MoE layer (``course_lib.deepseek.v3.V3``: 256 routed, 1 shared, top-8, 8 groups keep 4,
        scale 2.5, sigmoid)."""
        return cls(**preset(cls))


@dataclass
class RoutingInfo:
    """What one MoE forward decided, for balancing and analysis (N tokens, K experts each, E experts).

    ``scores`` keeps its graph (the sequence-wise loss back-propagates through it); the rest is data.
    """

    weights: torch.Tensor  # (N, K) combine weights g (unbiased, renormalised, times route_scale)
    indices: torch.Tensor  # (N, K) chosen experts (int64)
    scores: torch.Tensor  # (N, E) unbiased affinities s
    load: torch.Tensor  # (E,) assignments per expert before capacity dropping (float32)
    kept: torch.Tensor | None = None  # (N, K) False where the capacity limit dropped the assignment
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    @property
    def n_dropped(self) -> int:
        return 0 if self.kept is None else int((~self.kept).sum())


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, (E,) float32, from chosen ``indices`` of any shape."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).to(torch.float32)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = ``max_i load_i / mean(load) - 1`` (0 when perfectly balanced), as a Python float."""
    load = load.to(torch.float64)
    return float(load.max() / load.mean() - 1.0)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * N * K / E)``."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def dispatch_per_token(experts: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, weights: torch.Tensor,
                       indices: torch.Tensor) -> torch.Tensor:
    """Baseline and oracle: a Python loop over tokens and their K experts (slow, obviously right).

    ``y_t = sum_k weights[t, k] * experts[indices[t, k]](x_t)``; x (N, D), weights and indices (N, K).
    """
    rows = []
    idx = indices.tolist()
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k, e in enumerate(idx[t]):
            acc = acc + weights[t, k].to(x.dtype) * experts[e](x[t : t + 1])[0]
        rows.append(acc)
    return torch.stack(rows)  # (N, D)
