"""Memory planner for DeepSeek-V3 (671B): parameters, KV cache, optimiser state, per-GPU memory.

Everything is counted from the configuration (``inference/configs/config_671B.json``), so the
published totals come out instead of going in:

- parameters per component (embedding, MLA attention, dense MLPs, shared and routed experts,
  router, norms, output head); total 671.0B, active per token 36.6B ("671B total, 37B activated");
- KV cache per token: MLA caches ``d_c + d_h^R = 576`` elements per layer, standard MHA
  ``2 n_h d_h = 32768`` (56.9x more); in BF16 over 61 layers that is 70,272 bytes (~70 KB) vs
  ~4 MB per token, 8.6 GiB vs 488 GiB for one 128K-token sequence;
- model states per GPU (weights, gradients, FP32 master weights, Adam moments) under a
  parallel layout of EP/TP/PP/DP degrees, with ZeRO-1 sharding of the optimiser state.

Counting (:mod:`course_lib.param_count`, re-exported here): active parameters are all but the routed experts a
token did not pick and the embedding table (V3 671.0B / 36.6B, "671B total, 37B activated"; V2 235.7B / 20.9B,
V2-Lite 15.7B / 2.45B); the router's balancing bias is a buffer, not a parameter; the MTP module (~11.6B, plus
copies of embedding and head in the released checkpoint: 685B in all) is excluded unless ``include_mtp=True``.

This module is the course's reference for Exercise 6.3 (the answer key: graded notebooks cannot import
it). The shapes, precisions and layouts it counts from live in :mod:`course_lib.plan_config` and are
re-exported here.
"""

from __future__ import annotations

import math

from course_lib.param_count import active_params, count_params, expert_params, mla_params_per_layer, total_params
from course_lib.plan_config import (
    BF16_MIXED,
    COMPONENTS,
    DEEPSEEK_V3,
    V3_TRAINING,
    GiB,
    ModelConfig,
    Parallelism,
    Precision,
    attention_training_flops_per_token,
)

__all__ = [
    "ModelConfig",
    "COMPONENTS",
    "mla_params_per_layer",
    "expert_params",
    "count_params",
    "total_params",
    "active_params",
    "kv_cache_elements_per_token",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes",
    "Precision",
    "BF16_MIXED",
    "DEEPSEEK_V3",
    "Parallelism",
    "V3_TRAINING",
    "per_gpu_memory",
    "concurrent_requests",
    "training_flops_per_token",
    "GiB",
    "attention_training_flops_per_token",
]


def kv_cache_elements_per_token(cfg: ModelConfig, kind: str = "mla") -> int:
    """Cached elements per token per layer: ``mla`` d_c + d_h^R; ``mla_naive`` n_h (d_h + d_h^R + d_v);
    ``mha`` 2 n_h d_h (standard attention with 128-dim heads for keys and values)."""
    if kind == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if kind == "mla_naive":
        return cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    if kind == "mha":
        return 2 * cfg.n_heads * cfg.qk_nope_head_dim
    raise ValueError(f"kind must be 'mla', 'mla_naive' or 'mha', got {kind!r}")


def kv_cache_bytes_per_token(cfg: ModelConfig, kind: str = "mla", bytes_per_element: float = 2) -> float:
    """Bytes one token adds to the cache over all layers (BF16 by default)."""
    return kv_cache_elements_per_token(cfg, kind) * cfg.n_layers * bytes_per_element


def kv_cache_bytes(cfg: ModelConfig, tokens: int, kind: str = "mla", bytes_per_element: float = 2, batch: int = 1) -> float:
    """Cache bytes of ``batch`` sequences of ``tokens`` tokens each."""
    return kv_cache_bytes_per_token(cfg, kind, bytes_per_element) * tokens * batch


def per_gpu_memory(cfg: ModelConfig, par: Parallelism, prec: Precision = DEEPSEEK_V3) -> dict[str, float]:
    """Bytes of model states on one GPU (activations and buffers not included).

    With ``E`` the routed-expert parameters and ``O`` all others::

        params/GPU  P = O / (tp pp) + E / (ep pp)
        weights     P * prec.weights
        grads       P * prec.grads
        states      (O + E) * prec.states / (dp tp pp)      with ZeRO-1 (every GPU holds 1/world)
                    P * prec.states                         without

    Returns ``params``, ``weights``, ``grads``, ``states`` (master + moments) and ``total`` (bytes).
    """
    par.check(cfg)
    c = count_params(cfg)
    E = c["routed_experts"]
    O = sum(c.values()) - E
    P = O / (par.tp * par.pp) + E / (par.ep * par.pp)
    states = (O + E) * prec.states / par.world if par.zero1 else P * prec.states
    weights, grads = P * prec.weights, P * prec.grads
    return {"params": P, "weights": weights, "grads": grads, "states": states, "total": weights + grads + states}


def concurrent_requests(cfg: ModelConfig, context: int, free_bytes: float, kind: str = "mla",
                        bytes_per_element: float = 2) -> int:
    """How many sequences of ``context`` tokens fit their KV caches into ``free_bytes``."""
    return int(free_bytes // kv_cache_bytes(cfg, context, kind, bytes_per_element))


def training_flops_per_token(cfg: ModelConfig, seq_len: int = 4096) -> float:
    """Forward + backward FLOPs per trained token: ``6 N_active`` plus causal attention scores and sums.

    See :func:`course_lib.plan_config.attention_training_flops_per_token`. For V3 at 4K this gives ~250 GFLOP
    per token.
    """
    return 6 * active_params(cfg) + attention_training_flops_per_token(cfg, seq_len)


def _fmt(n: float) -> str:  # pragma: no cover - display helper
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


if __name__ == "__main__":  # pragma: no cover
    cfg = ModelConfig()
    for k, v in count_params(cfg).items():
        print(f"{k:>15}: {_fmt(v)}")
    print(f"total {_fmt(total_params(cfg))}, active {_fmt(active_params(cfg))}")
    for kind in ("mla", "mha"):
        print(kind, kv_cache_bytes_per_token(cfg, kind), "B/token;", kv_cache_bytes(cfg, 128 * 1024, kind) / GiB, "GiB at 128K")
    m = per_gpu_memory(cfg, V3_TRAINING)
    print({k: round(v / GiB, 2) for k, v in m.items()}, math.nan)
