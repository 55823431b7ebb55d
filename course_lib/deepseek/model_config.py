"""What Section 5 gives the learner around DeepSeekV3Mini: the configuration, the output records, the
initialisation, the FP8 conversion and a dense baseline model. None of it is an exercise's answer.

- ``ModelConfig``: every size, with DeepSeek's ``ModelArgs`` names; ``ModelConfig()`` is the laptop model the
  notebook trains, ``ModelConfig.v3()`` DeepSeek-V3 (671B, for counting only). ``cfg.mla()`` / ``cfg.moe()`` build
  one layer's ``MLAConfig`` / ``MoEConfig``; ``cfg.is_moe_layer(i)`` says whether block ``i`` gets an MoE.
- ``ModelOutput`` (what ``compute_loss`` returns) and ``StepStats`` (what a training step reports).
- ``init_weights``: a deterministic initialisation that depends only on parameter names, so two implementations
  with the same attribute names start from the same weights.
- ``convert_to_fp8``: every ``nn.Linear`` of a module on emulated FP8 GEMMs (Section 4's ``FP8Linear``).
- ``MHABaseline``: a standard dense decoder of the same width and depth (the memory comparison).
- ``masked_cross_entropy``: cross-entropy over the positions whose target is not ``IGNORE_INDEX``.

The reference model (``TransformerBlock``, ``MTPModule``, ``DeepSeekV3Mini``, ``param_counts``, ``train_step``) is in
``course_lib.deepseek.model``, which re-exports everything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.mla import MLAConfig
from course_lib.deepseek.moe import MoEConfig, RoutingInfo
from course_lib.deepseek.v3 import preset

__all__ = ["IGNORE_INDEX", "ModelConfig", "ModelOutput", "StepStats", "init_weights", "convert_to_fp8", "MHABaseline",
           "masked_cross_entropy"]

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """Sizes of DeepSeekV3Mini. Field names follow DeepSeek's ``ModelArgs``.

    The default trains on a laptop CPU in well under a minute on ``course_lib.data.MultiTaskLanguage``;
    ``ModelConfig.v3()`` is DeepSeek-V3 (671B), for parameter counts only.
    """

    vocab_size: int = 18
    dim: int = 64
    n_layers: int = 2
    n_dense_layers: int = 1  # first k layers use a dense SwiGLU FFN (HF: first_k_dense_replace)
    n_heads: int = 4
    inter_dim: int = 128  # dense FFN width
    q_lora_rank: int = 32  # 0: no query compression
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    moe_inter_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free balancing
    seq_aux_alpha: float = 1e-4  # alpha of the complementary sequence-wise balance loss
    group_mask_fill: float = float("-inf")
    mtp_depth: int = 1  # D; 0 disables multi-token prediction
    mtp_lambda: float = 0.3
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # context extension, as MLAConfig (DeepSeek's inference/model.py): beyond original_seq_len choose a rope scaling
    original_seq_len: int = 4096
    rope_scaling: str | None = None  # None (not chosen), "none" (plain RoPE) or "yarn" (DeepSeek-V3)
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    fp8: bool = False  # FP8 (emulated on CPU) GEMMs in every linear layer of the blocks

    def __post_init__(self) -> None:
        if not 0 <= self.n_dense_layers <= self.n_layers or self.n_layers < 1:
            raise ValueError(f"need n_layers >= 1 and 0 <= n_dense_layers <= n_layers, got {self.n_layers}, {self.n_dense_layers}")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")
        self.mla()  # validates the context length and rope scaling (max_seq_len > original_seq_len needs a choice)
        self.moe()  # validates the routing fields

    @classmethod
    def v3(cls, max_seq_len: int = 4096) -> ModelConfig:
        """DeepSeek-V3 (``course_lib.deepseek.v3.V3``): 61 layers, first 3 dense, 256 experts, top-8, YaRN chosen
        (active only for ``max_seq_len > 4096``; DeepSeek's generate.py runs at 16384)."""
        return cls(**preset(cls, max_seq_len=max_seq_len, rope_scaling="yarn"))

    def mla(self) -> MLAConfig:
        return MLAConfig(dim=self.dim, n_heads=self.n_heads, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                         qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                         max_seq_len=self.max_seq_len, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                         original_seq_len=self.original_seq_len, rope_scaling=self.rope_scaling, rope_factor=self.rope_factor,
                         beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale)

    def moe(self) -> MoEConfig:
        return MoEConfig(dim=self.dim, moe_inter_dim=self.moe_inter_dim, n_routed_experts=self.n_routed_experts,
                         n_shared_experts=self.n_shared_experts, n_activated_experts=self.n_activated_experts,
                         n_expert_groups=self.n_expert_groups, n_limited_groups=self.n_limited_groups, route_scale=self.route_scale,
                         score_func="sigmoid", bias_update_speed=self.bias_update_speed, seq_aux_alpha=self.seq_aux_alpha,
                         group_mask_fill=self.group_mask_fill)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layers ``n_dense_layers, ...`` (MTP blocks included) use DeepSeekMoE; the first ones a dense FFN."""
        return layer_id >= self.n_dense_layers


@dataclass
class ModelOutput:
    """What ``compute_loss`` returns. ``infos``: routing of every MoE layer, main blocks first, then MTP blocks."""

    loss: torch.Tensor
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    infos: list[RoutingInfo] = field(default_factory=list)


@dataclass
class StepStats:
    """One training step: losses, gradient norm (before clipping), and each MoE layer's load and MaxVio."""

    loss: float
    main_loss: float
    mtp_loss: float
    aux_loss: float
    grad_norm: float
    loads: list[torch.Tensor]
    max_vio: list[float]


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., vocab) over the targets (...) that are not IGNORE_INDEX (0 when none is)."""
    if not bool((targets != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------
# Initialisation and FP8
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Deterministic initialisation that depends only on parameter *names* (not on construction order).

    Every matrix ~ N(0, std) (HF's ``initializer_range``), output projections (``wo``, ``w2``) scaled by
    ``1 / sqrt(2 n_layers)`` (GPT-2), RMSNorm weights 1, gate biases 0. Parameter ``name`` draws from a
    generator seeded with ``seed`` and the name, so two implementations with the same names start equal.
    """
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", 1)
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        if p.dim() == 1:
            p.fill_(1.0)  # RMSNorm weights
            continue
        s = std / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(s).to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.zero_()
    return model


def _stable_hash(s: str) -> int:
    """A hash that is the same in every Python process (``hash`` of a str is randomised)."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2**64)
    return h


def convert_to_fp8(module: nn.Module, recipe: str = "auto", linear_cls: type[nn.Module] | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` under ``module`` for an ``FP8Linear`` (FP8 GEMMs, FP32 master weights), in place.

    DeepSeek-V3 keeps the embedding, output head, router gate, norms and the attention core in higher
    precision: call this on the blocks only (``DeepSeekV3Mini(cfg)`` with ``cfg.fp8`` does). ``linear_cls``: another
    class with ``from_linear(linear, recipe=...)`` (Section 5 passes the learner's), the course's ``FP8Linear`` by default.
    """
    if linear_cls is None:
        from course_lib.deepseek.fp8 import FP8Linear as linear_cls

    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, linear_cls.from_linear(child, recipe=recipe))
        else:
            convert_to_fp8(child, recipe, linear_cls)
    return module


# ---------------------------------------------------------------------------------------------------
# A dense multi-head-attention baseline of the same width (memory comparison)
# ---------------------------------------------------------------------------------------------------


class MHABaseline(nn.Module):
    """A standard decoder (MHA with RoPE on the whole head, dense SwiGLU FFN) of width ``cfg.dim``:
    the baseline of the memory experiment. ``head_dim`` defaults to ``qk_nope_head_dim + qk_rope_head_dim``."""

    def __init__(self, cfg: ModelConfig, head_dim: int | None = None, inter_dim: int | None = None) -> None:
        super().__init__()
        from course_lib.deepseek.mla import MultiHeadAttention

        self.cfg = cfg
        hd = head_dim or cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.attn_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.rms_norm_eps) for _ in range(cfg.n_layers))
        self.attns = nn.ModuleList(MultiHeadAttention(cfg.dim, cfg.n_heads, hd, max_seq_len=cfg.max_seq_len, rope_theta=cfg.rope_theta)
                                   for _ in range(cfg.n_layers))
        self.ffn_norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.rms_norm_eps) for _ in range(cfg.n_layers))
        self.ffns = nn.ModuleList(SwiGLU(cfg.dim, inter_dim or cfg.inter_dim) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def new_caches(self, batch: int, max_seq_len: int | None = None):
        return [a.new_cache(batch, max_seq_len) for a in self.attns]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches=None) -> torch.Tensor:
        h = self.embed(tokens)  # (B, T, dim)
        for i in range(len(self.attns)):
            h = h + self.attns[i](self.attn_norms[i](h), start_pos, None if caches is None else caches[i])
            h = h + self.ffns[i](self.ffn_norms[i](h))
        return self.head(self.norm(h))  # (B, T, vocab)
