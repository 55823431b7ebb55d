"""The course's parameter counter: DeepSeek-V3's parameters by component, total and active, from the config alone.

One counter and one convention for the whole course:

- **Active parameters** are the weights one token multiplies with: everything except the routed experts it did not
  pick and except the embedding table, from which a token reads one row. This is DeepSeek's "37B activated"
  (36.6B for V3; 671.0B total), and the same convention reproduces V2's "236B / 21B" and V2-Lite's "15.7B / 2.4B".
- **The router's bias is not a parameter.** The per-expert selection bias of auxiliary-loss-free balancing is a
  buffer: it gets no gradient, the balancing rule moves it, and no optimiser state is kept for it (256 numbers per
  MoE layer, 14,848 in V3). The gate's weight is counted with the router.
- The multi-token-prediction module (11.6B for V3) is reported on its own, never in the total.

Learners write this counter in Section 5 (Exercise 5.2.3, ``count_parameters``, on top of Section 3's MoE-layer
count, ``course_lib.deepseek.moe.param_counts``); Section 6 is given this module and builds its memory planner on
it. Any config with DeepSeek's field names works (``course_lib.plan_config.ModelConfig`` or the model's
``course_lib.deepseek.model_config.ModelConfig``). No torch needed.
"""

from __future__ import annotations

from typing import Any

from course_lib.plan_config import COMPONENTS

__all__ = ["COMPONENTS", "mla_params_per_layer", "expert_params", "count_params", "total_params", "active_params"]

def mla_params_per_layer(cfg: Any) -> int:
    """Weights of one MLA block: W_DQ, q_norm, W_UQ(+W_QR) (or one W_Q when ``q_lora_rank == 0``), W_DKV(+W_KR),
    kv_norm, W_UK/W_UV, W_O."""
    H, qk = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk  # wq_a, q_norm, wq_b
    else:
        q = cfg.dim * H * qk  # wq
    kv_a = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank  # wkv_a, kv_norm
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_b
    o = H * cfg.v_head_dim * cfg.dim  # wo
    return q + kv_a + kv_b + o


def expert_params(cfg: Any) -> int:
    """One SwiGLU expert: w1, w3 (dim -> moe_inter_dim) and w2 (back)."""
    return 3 * cfg.dim * cfg.moe_inter_dim


def _moe_block(cfg: Any) -> int:
    """One MoE layer: the gate's weight (no bias: a buffer), the shared and the routed experts."""
    return cfg.n_routed_experts * cfg.dim + (cfg.n_shared_experts + cfg.n_routed_experts) * expert_params(cfg)


def count_params(cfg: Any, *, include_mtp: bool = False) -> dict[str, int]:
    """Parameters per component (keys ``COMPONENTS``, plus ``"mtp"`` when ``include_mtp``).

    ``mtp`` is the released checkpoint's MTP layer: enorm, hnorm, eh_proj (2d -> d), one MoE block, its final norm,
    and the copies of the embedding and head that the checkpoint stores (684.5B in all, the hub's "685B").
    """
    n_moe = cfg.n_layers - cfg.n_dense_layers
    out = {
        "embedding": cfg.vocab_size * cfg.dim,
        "attention": cfg.n_layers * mla_params_per_layer(cfg),
        "dense_mlp": cfg.n_dense_layers * 3 * cfg.dim * cfg.inter_dim,
        "shared_experts": n_moe * cfg.n_shared_experts * expert_params(cfg),
        "routed_experts": n_moe * cfg.n_routed_experts * expert_params(cfg),
        "router": n_moe * cfg.n_routed_experts * cfg.dim,  # gate weights; the balancing bias is a buffer
        "norms": cfg.n_layers * 2 * cfg.dim + cfg.dim,  # attn_norm, ffn_norm per layer; final norm
        "head": cfg.vocab_size * cfg.dim,
    }
    if include_mtp:
        block = mla_params_per_layer(cfg) + _moe_block(cfg) + 2 * cfg.dim
        out["mtp"] = 2 * cfg.dim + 2 * cfg.dim * cfg.dim + block + cfg.dim + 2 * cfg.vocab_size * cfg.dim
    return out


def total_params(cfg: Any) -> int:
    """All parameters of the main model (MTP excluded): 671.0B for V3."""
    return sum(count_params(cfg).values())


def active_params(cfg: Any) -> int:
    """Parameters one token multiplies with: all but the unchosen routed experts and the embedding table
    (36.6B for V3, DeepSeek's "37B activated")."""
    c = count_params(cfg)
    routed_active = (cfg.n_layers - cfg.n_dense_layers) * cfg.n_activated_experts * expert_params(cfg)
    return sum(c.values()) - c["routed_experts"] + routed_active - c["embedding"]
