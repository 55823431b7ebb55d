"""The planner's given building blocks: DeepSeek's shapes, precisions and parallel layouts (no torch needed).

What Section 6's memory planner (Exercise 6.3) counts *from*: :class:`ModelConfig` (defaults: the 671B
model, ``inference/configs/config_671B.json``; ``v2()`` and ``v2_lite()`` for DeepSeek-V2), the bytes
per parameter of each model state (:class:`Precision`, ``BF16_MIXED``, ``DEEPSEEK_V3``), parallel
layouts (:class:`Parallelism`, ``V3_TRAINING``) and the attention FLOPs of a training step. The parameter
counts come from :mod:`course_lib.param_count` (Section 5's counter, given in Section 6); the KV cache and
per-GPU memory are the exercise, whose reference version is ``course_lib.planner``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from course_lib.deepseek.v3 import V3

__all__ = [
    "GiB",
    "COMPONENTS",
    "ModelConfig",
    "Precision",
    "BF16_MIXED",
    "DEEPSEEK_V3",
    "Parallelism",
    "V3_TRAINING",
    "attention_training_flops_per_token",
]

GiB = 1024**3

COMPONENTS = ("embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms", "head")


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3's shape; the defaults are the 671B model (``course_lib.deepseek.v3.V3``, config_671B.json)."""

    vocab_size: int = V3["vocab_size"]
    dim: int = V3["dim"]
    n_layers: int = V3["n_layers"]
    n_dense_layers: int = V3["n_dense_layers"]
    n_heads: int = V3["n_heads"]
    q_lora_rank: int = V3["q_lora_rank"]  # d_c' (0: no query compression)
    kv_lora_rank: int = V3["kv_lora_rank"]  # d_c
    qk_nope_head_dim: int = V3["qk_nope_head_dim"]  # d_h
    qk_rope_head_dim: int = V3["qk_rope_head_dim"]  # d_h^R
    v_head_dim: int = V3["v_head_dim"]
    inter_dim: int = V3["inter_dim"]  # dense MLP
    moe_inter_dim: int = V3["moe_inter_dim"]  # each expert
    n_routed_experts: int = V3["n_routed_experts"]
    n_shared_experts: int = V3["n_shared_experts"]
    n_activated_experts: int = V3["n_activated_experts"]
    n_expert_groups: int = V3["n_expert_groups"]
    n_limited_groups: int = V3["n_limited_groups"]

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @classmethod
    def v3(cls) -> ModelConfig:
        return cls()

    @classmethod
    def v2(cls) -> ModelConfig:
        """DeepSeek-V2 (236B total, 21B active)."""
        return cls(vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, inter_dim=12288, moe_inter_dim=1536,
                   n_routed_experts=160, n_shared_experts=2, n_activated_experts=6, n_expert_groups=8, n_limited_groups=3)

    @classmethod
    def v2_lite(cls) -> ModelConfig:
        """DeepSeek-V2-Lite (15.7B total, 2.4B active): no query compression, 16 heads."""
        return cls(vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, n_heads=16, q_lora_rank=0, inter_dim=10944,
                   moe_inter_dim=1408, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
                   n_limited_groups=1)

    def scaled(self, **changes) -> ModelConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state."""

    weights: float = 2.0  # BF16 working copy (FP8 GEMM inputs are cast from it on the fly)
    grads: float = 4.0  # FP32 gradient accumulation
    master: float = 4.0  # FP32 master weights
    optimizer: float = 8.0  # Adam first and second moments

    @property
    def states(self) -> float:
        """Bytes per parameter that ZeRO-1 shards: master weights and optimiser moments."""
        return self.master + self.optimizer


#: Classic mixed precision: BF16 weights, FP32 grads, FP32 master, FP32 Adam moments (18 bytes/param).
BF16_MIXED = Precision(2.0, 4.0, 4.0, 8.0)
#: DeepSeek-V3's recipe: FP32 master weights and gradients, Adam moments kept in BF16 (14 bytes/param).
DEEPSEEK_V3 = Precision(2.0, 4.0, 4.0, 4.0)


@dataclass(frozen=True)
class Parallelism:
    """A parallel layout: ``world = dp * tp * pp`` GPUs; expert parallelism ``ep`` is carved out of ``dp * tp``.

    - PP splits the layers (the planner assumes an even split of the parameters over stages);
    - TP splits every non-routed-expert weight (attention, dense MLPs, shared experts, router,
      embedding, head) ``tp`` ways;
    - EP splits the routed experts ``ep`` ways; the ``dp * tp / ep`` groups holding the same experts
      are the experts' data-parallel replicas;
    - ZeRO-1 shards master weights and optimiser moments over each parameter's data-parallel replicas.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero1: bool = True

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def check(self, cfg: ModelConfig) -> None:
        if min(self.dp, self.tp, self.pp, self.ep) < 1:
            raise ValueError(f"parallel degrees must be >= 1, got {self}")
        if (self.dp * self.tp) % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp*tp={self.dp * self.tp} (experts live inside the data-parallel group)")
        if cfg.n_routed_experts % self.ep:
            raise ValueError(f"ep={self.ep} must divide n_routed_experts={cfg.n_routed_experts}")


#: DeepSeek-V3 pre-training on 2048 H800s: 16-way PP, 64-way EP (over 8 nodes), ZeRO-1 DP, no TP.
V3_TRAINING = Parallelism(dp=128, tp=1, pp=16, ep=64, zero1=True)


def attention_training_flops_per_token(cfg: ModelConfig, seq_len: int = 4096) -> float:
    """Forward + backward FLOPs of the attention scores and weighted sums per trained token (no weights).

    Per layer and token, with the average causal context ``s = seq_len / 2``: the forward takes
    ``2 n_h (d_h + d_h^R) s`` for ``q k^T`` and ``2 n_h d_v s`` for ``p v``; the backward doubles it (x3).
    A step's model FLOPs per token are ``6 N_active`` plus this (about 250 GFLOP for V3 at 4K).
    """
    s = seq_len / 2
    return 3 * 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * s * cfg.n_layers
