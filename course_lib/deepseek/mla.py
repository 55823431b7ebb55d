"""Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1 / DeepSeek-V3 section 2.1.1.

The compact reference: Section 2's judges compare the learner's layers with it, and Section 5's model is
built on it. It holds the ANSWERS to Section 2's exercises (``causal_mask``, ``MultiHeadAttention``,
``MLA``), so Section 2's grading kernel cannot import it. The given parts (``MLAConfig``, the caches,
``check_input``, ``HF_NAMES``) live in :mod:`course_lib.deepseek.attention` and are re-exported here.

Equations (DeepSeek-V2 eqs. 9-19; ``h`` is the layer input, ``H`` heads)::

    c_Q   = q_norm(W_DQ h)                          (q_lora_rank)          wq_a, q_norm
    [q_nope_i ; q_pe_i] = W_UQ c_Q                  (H x (d_h + d_h^R))    wq_b  (wq when q_lora_rank == 0)
    q_pe_i = RoPE(q_pe_i)                           RoPE on the rope slice only
    [c_KV_raw ; k_pe] = W_KV_A h                    (kv_lora_rank + d_h^R) wkv_a
    c_KV  = kv_norm(c_KV_raw)                       kv_norm never touches k_pe
    k_pe  = RoPE(k_pe)                              ONE rope key shared by all heads
    [k_nope_i ; v_i] = W_UKV c_KV                   (H x (d_h + d_v))      wkv_b
    k_i   = [k_nope_i ; k_pe],  q_i = [q_nope_i ; q_pe_i]
    o_i   = softmax(q_i k_i^T / sqrt(d_h + d_h^R) + causal mask) v_i
    out   = W_O [o_1 ; ... ; o_H]                                          wo

Absorbed path (same numbers, different order of operations; ``W_UK_i``, ``W_UV_i`` are the rows of
``wkv_b`` that produce ``k_nope_i`` and ``v_i``)::

    q_lat_i = q_nope_i W_UK_i                       (kv_lora_rank per head)
    score_i = (q_lat_i c_KV^T + q_pe_i k_pe^T) / sqrt(d_h + d_h^R)
    o_i     = (softmax(score_i) c_KV) W_UV_i^T      attend in latent space, then up-project

Parameter names follow DeepSeek's inference code so Section 5 can map weights to HF transformers'
``DeepseekV3Attention``: ``wq_a -> q_a_proj``, ``q_norm -> q_a_layernorm``, ``wq_b -> q_b_proj``
(``wq -> q_proj``), ``wkv_a -> kv_a_proj_with_mqa``, ``kv_norm -> kv_a_layernorm``,
``wkv_b -> kv_b_proj``, ``wo -> o_proj`` (see ``HF_NAMES``). RoPE rotates interleaved pairs
(``course_lib.deepseek.common``), which HF reproduces with ``rope_interleave=True``. YaRN follows DeepSeek's
``inference/model.py``: when ``cfg.yarn`` (``rope_scaling="yarn"`` and ``max_seq_len > original_seq_len``) the
rotary frequencies are ``cfg.rope_frequencies()`` (``common.yarn_frequencies``) and the softmax scale of both paths
is ``cfg.softmax_scale`` = ``mscale^2 / sqrt(d_h + d_h^R)``; otherwise exactly ``1/sqrt(d_h + d_h^R)``. Only the
rotary dims change: the cache holds the same 576 numbers per token.

Interface::

    cfg = MLAConfig()                       # small; MLAConfig.v3() for the 671B dimensions
    attn = MLA(cfg)
    y = attn(x)                             # (B, T, dim), full causal self-attention, naive path
    y, p = attn(x, return_attn=True)        # p: (B, H, T, T) attention probabilities
    cache = attn.new_cache(batch=B)         # LatentKVCache: normalised c_KV and roped k_pe only
    y = attn(prompt, 0, cache, absorb=True)                # prefill positions [0, T)
    y = attn(next_tok, T, cache, absorb=True)              # decode position T (reads [0, T])
    attn(next_tok, T, cache, absorb=False)                 # naive: re-expands K, V from the latent
    full = attn.new_cache(batch=B, kind="full")            # KVCache of per-head K and V (naive only)

Use ``absorb=False`` for training and prefill (fewer FLOPs: the T^2 attention runs over d_h + d_h^R + d_v
per head instead of 2 d_c + d_h^R) and ``absorb=True`` for decoding (the cache is never up-projected).
Both paths give the same output (float64: ~1e-15). The pieces are public for tests and figures:
``queries(x, angles)``, ``latent(x, angles)`` (what the cache holds), ``expand(c_kv, k_pe)``, ``w_uk_uv()``,
``attend_naive``, ``attend_absorbed``; ``MLAConfig`` (``course_lib.deepseek.attention``) gives ``qk_head_dim``,
``softmax_scale`` and the cache sizes per token (``latent_cache_elements_per_token`` = 576 and
``full_cache_elements_per_token`` = 40960 at V3).

``MultiHeadAttention`` is standard multi-head attention (RoPE on the whole head) with a ``KVCache``,
the baseline every comparison uses. ``causal_mask(t_q, t_k)`` is the additive mask both use and
``check_input`` their input validation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from course_lib.deepseek.attention import (  # the given parts, re-exported here
    HF_NAMES,
    KVCache,
    LatentKVCache,
    MLAConfig,
    check_input,
    mha_cache_elements_per_token,
)
from course_lib.deepseek.common import RMSNorm, apply_rope, rope_angles

__all__ = [
    "MLAConfig",
    "MLA",
    "MultiHeadAttention",
    "LatentKVCache",
    "KVCache",
    "causal_mask",
    "check_input",
    "mha_cache_elements_per_token",
    "HF_NAMES",
]


def causal_mask(t_q: int, t_k: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Additive causal mask of shape (t_q, t_k): 0 where query ``i`` may see key ``j``, ``-inf`` elsewhere.

    The queries are the last ``t_q`` of the ``t_k`` key positions (a cache holds ``[0, start_pos + t_q)``
    when the queries sit at ``[start_pos, start_pos + t_q)``), so query ``i`` sees keys
    ``j <= i + t_k - t_q``.
    """
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)  # j <= i + (t_k - t_q)
    return torch.full((t_q, t_k), float("-inf"), dtype=dtype, device=device).masked_fill(visible, 0.0)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in float32 when the scores are half precision."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
    return scores.softmax(-1)


def _angles_for(x: torch.Tensor, start_pos: int, dim: int, theta: float, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE angles of the T tokens of ``x`` at absolute positions ``start_pos ..``, always computed in float64
    (``freqs``: the (dim/2,) frequencies, e.g. YaRN's; default ``theta^(-2i/dim)``)."""
    positions = start_pos + torch.arange(x.shape[1], device=x.device)
    return rope_angles(positions, dim, theta, dtype=torch.float64, freqs=freqs)  # (T, dim / 2)


class MLA(nn.Module):
    """Multi-head Latent Attention with a naive and an absorbed path (see the module docstring)."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, heads, eps = cfg.dim, cfg.n_heads, cfg.rms_norm_eps
        lat, rot = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:  # W_DQ, its norm, then W_UQ and W_QR fused
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, bias=False)
        else:  # V2-Lite style: one W_Q, no query compression
            self.wq = nn.Linear(d, heads * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, lat + rot, bias=False)  # W_DKV and W_KR fused: [latent ; rotary key]
        self.kv_norm = RMSNorm(lat, eps)  # the latent only
        self.wkv_b = nn.Linear(lat, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)  # per head [W_UK ; W_UV]
        self.wo = nn.Linear(heads * cfg.v_head_dim, d, bias=False)  # W_O
        self.softmax_scale = cfg.softmax_scale  # 1/sqrt(d_h + d_h^R), times mscale^2 when YaRN is active

    def new_cache(self, batch: int, max_seq_len: int | None = None, *, kind: str = "latent",
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LatentKVCache | KVCache:
        """An empty cache for this layer: ``kind="latent"`` (c_KV + k_pe) or ``"full"`` (per-head K and V)."""
        c = self.cfg
        w = self.wkv_a.weight
        kw = {"dtype": dtype or w.dtype, "device": device or w.device}
        S = max_seq_len or c.max_seq_len
        if kind == "latent":
            return LatentKVCache(batch, S, c.kv_lora_rank, c.qk_rope_head_dim, **kw)
        if kind == "full":
            return KVCache(batch, S, c.n_heads, c.qk_head_dim, c.v_head_dim, **kw)
        raise ValueError(f"kind must be 'latent' or 'full', got {kind!r}")

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``wkv_b`` split per head: W_UK (H, d_h, d_c) and W_UV (H, d_v, d_c)."""
        c = self.cfg
        blocks = self.wkv_b.weight.unflatten(0, (c.n_heads, -1))  # (H, d_h + d_v, d_c): one block per head
        w_uk, w_uv = torch.split(blocks, (c.qk_nope_head_dim, c.v_head_dim), dim=1)
        return w_uk, w_uv

    def queries(self, x: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_nope`` (B, T, H, d_h) and roped ``q_pe`` (B, T, H, d_h^R) for input ``x`` (B, T, dim)."""
        c = self.cfg
        flat = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)  # (B, T, H * (d_h + d_h^R))
        per_head = flat.unflatten(-1, (c.n_heads, c.qk_head_dim))  # (B, T, H, d_h + d_h^R)
        q_nope = per_head[..., : c.qk_nope_head_dim]
        return q_nope, apply_rope(per_head[..., c.qk_nope_head_dim :], angles)

    def latent(self, x: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``c_kv`` (B, T, d_c) and roped shared ``k_pe`` (B, T, d_h^R): what the latent cache holds."""
        down = self.wkv_a(x)  # (B, T, d_c + d_h^R)
        d_c = self.cfg.kv_lora_rank
        return self.kv_norm(down[..., :d_c]), apply_rope(down[..., d_c:], angles)

    def expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Naive up-projection: keys (B, S, H, d_h + d_h^R) with ``k_pe`` broadcast to every head, values (B, S, H, d_v)."""
        c = self.cfg
        w_uk, w_uv = self.w_uk_uv()
        k_nope = torch.einsum("bsc,hdc->bshd", c_kv, w_uk)  # (B, S, H, d_h)
        values = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)  # (B, S, H, d_v)
        shared = k_pe.unsqueeze(2).expand(-1, -1, c.n_heads, -1)  # (B, S, H, d_h^R): one key, every head
        return torch.cat((k_nope, shared), dim=-1), values

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: LatentKVCache | KVCache | None = None, *,
                absorb: bool = False, return_attn: bool = False):
        """Causal MLA over ``x`` (B, T, dim) at absolute positions ``[start_pos, start_pos + T)``.

        ``cache=None``: attend among the T tokens only. With a cache: write this chunk, attend over all
        cached positions ``[0, start_pos + T)``. ``absorb`` selects the absorbed path (latent cache or
        none); a ``KVCache`` works with the naive path only. Returns (B, T, dim), and the attention
        probabilities (B, H, T, S) when ``return_attn``.
        """
        c = self.cfg
        check_input(x, c.dim, start_pos, c.max_seq_len)
        freqs = c.rope_frequencies(x.device) if c.yarn else None  # YaRN's, beyond original_seq_len
        angles = _angles_for(x, start_pos, c.qk_rope_head_dim, c.rope_theta, freqs)
        q_nope, q_pe = self.queries(x, angles)  # (B, T, H, d_h), (B, T, H, d_h^R)
        c_kv, k_pe = self.latent(x, angles)  # (B, T, d_c), (B, T, d_h^R)
        if isinstance(cache, KVCache):  # naive path over a cache of per-head K and V
            if absorb:
                raise ValueError("the absorbed path needs a LatentKVCache (it attends over c_kv), not a KVCache")
            o, p = self.attend_naive(q_nope, q_pe, *cache.update(start_pos, *self.expand(c_kv, k_pe)))
        else:
            if cache is not None:
                c_kv, k_pe = cache.update(start_pos, c_kv, k_pe)  # (B, S, d_c), (B, S, d_h^R)
            attend = self.attend_absorbed if absorb else (lambda qn, qp, ckv, kpe: self.attend_naive(qn, qp, *self.expand(ckv, kpe)))
            o, p = attend(q_nope, q_pe, c_kv, k_pe)
        out = self.wo(o.flatten(2))  # (B, T, H * d_v) -> (B, T, dim)
        return (out, p) if return_attn else out

    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``softmax([q_nope ; q_pe] k^T * scale + mask) v`` per head: o (B, T, H, d_v), p (B, H, T, S)."""
        T, S = q_nope.shape[1], k.shape[1]
        logits = torch.einsum("bthd,bshd->bhts", torch.cat((q_nope, q_pe), dim=-1), k) * self.softmax_scale
        p = _softmax(logits + causal_mask(T, S, dtype=logits.dtype, device=logits.device))  # (B, H, T, S)
        return torch.einsum("bhts,bshd->bthd", p, v), p

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                        k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention in the latent space: W_UK folded into the query, W_UV applied after (module docstring)."""
        w_uk, w_uv = self.w_uk_uv()  # (H, d_h, d_c), (H, d_v, d_c)
        T, S = q_nope.shape[1], c_kv.shape[1]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, d_c): W_UK folded into the query
        logits = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)) * self.softmax_scale
        p = _softmax(logits + causal_mask(T, S, dtype=logits.dtype, device=logits.device))  # (B, H, T, S)
        latent_mix = torch.einsum("bhts,bsc->bthc", p, c_kv)  # (B, T, H, d_c): attend in latent space
        return torch.einsum("bthc,hdc->bthd", latent_mix, w_uv), p  # (B, T, H, d_v)


class MultiHeadAttention(nn.Module):
    """Standard causal multi-head attention (Vaswani et al. 2017) with RoPE on the whole head and a ``KVCache``.

    ``softmax(q_i k_i^T / sqrt(d) + mask) v_i`` per head; caches ``2 H d`` elements per token.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int | None = None, *, max_seq_len: int = 512,
                 rope_theta: float = 10000.0, use_rope: bool = True) -> None:
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, head_dim or dim // n_heads
        self.max_seq_len, self.rope_theta, self.use_rope = max_seq_len, rope_theta, use_rope
        width = n_heads * self.head_dim  # every head side by side
        for name in ("wq", "wk", "wv"):  # W_Q, W_K, W_V
            setattr(self, name, nn.Linear(dim, width, bias=False))
        self.wo = nn.Linear(width, dim, bias=False)  # W_O

    def new_cache(self, batch: int, max_seq_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        ref = self.wk.weight
        return KVCache(batch, max_seq_len or self.max_seq_len, self.n_heads, self.head_dim,
                       dtype=dtype or ref.dtype, device=device or ref.device)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None, *, return_attn: bool = False):
        """Causal attention over ``x`` (B, T, dim) at positions ``[start_pos, start_pos + T)``; see ``MLA.forward``."""
        check_input(x, self.dim, start_pos, self.max_seq_len)
        T = x.shape[1]
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, self.head_dim)) for proj in (self.wq, self.wk, self.wv))
        if self.use_rope:  # the whole head rotates
            angles = _angles_for(x, start_pos, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, S, H, D) each
        logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_dim)
        p = _softmax(logits + causal_mask(T, k.shape[1], dtype=x.dtype, device=x.device))  # (B, H, T, S)
        out = self.wo(torch.einsum("bhts,bshd->bthd", p, v).flatten(2))  # (B, T, dim)
        return (out, p) if return_attn else out
