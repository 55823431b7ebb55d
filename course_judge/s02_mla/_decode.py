"""Structural checks of one absorbed decode step (shared by exercise 2.4 and the absorption benchmark).

The learner's module decodes one token against a filled latent cache under the kernel's profiler. A decode
step must not rebuild per-head keys or values of the cached tokens (no (B, S, H, d_v)-like intermediate), must
not build an S x S mask, and its FLOPs must stay within 1.5x of the course's absorbed step (counted here from
the configuration). All of these are deterministic, unlike a timing.
"""

from __future__ import annotations

import torch

from course_judge.checks import assert_true
from course_judge.s02_mla._common import drawn_in_kernel
from course_lib.deepseek.attention import MLAConfig

FLOP_FACTOR = 1.5


def fill(k, m, ref, cfg: MLAConfig, S: int, max_seq_len: int, *, seed: int, dtype=torch.float64):
    """The learner's and the reference's latent caches holding the same S random latents and rotary keys.

    They are drawn in the kernel from ``seed`` (and here): a decode step reads them, whatever produced them.
    """
    (c_ref, k_ref), (c_kv, k_pe) = drawn_in_kernel(k, seed, [(0.0, 1.0, (1, S, cfg.kv_lora_rank)),
                                                            (0.0, 1.0, (1, S, cfg.qk_rope_head_dim))], dtype)
    rcache = ref.new_cache(1, max_seq_len)
    rcache.update(0, c_kv, k_pe)
    cache = k.call(m.new_cache, 1, max_seq_len)
    k.call_opts(cache.update, [0, c_ref, k_ref], keep=True, no_grad=True)  # the views stay in the kernel
    return cache, rcache


def absorbed_decode_flops(cfg: MLAConfig, S: int, *, batch: int = 1, tokens: int = 1) -> int:
    """FLOPs torch's FlopCounterMode counts for the course's absorbed step of ``tokens`` new tokens over S cached ones.

    2 x (multiply-adds of every matrix product): the query path (wq_a, wq_b), wkv_a, W_UK folded into the query,
    the scores over c_kv and k_pe, the weighted sum of c_kv, W_UV and wo. Computed, not measured, so the judge
    need not load the profiler (tests/test_judge_s02.py checks it against FlopCounterMode).
    """
    c, H, BT = cfg, cfg.n_heads, batch * tokens
    q = c.dim * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim if c.q_lora_rank else c.dim * H * c.qk_head_dim
    per_token = (q + c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + H * c.qk_nope_head_dim * c.kv_lora_rank
                 + H * S * (2 * c.kv_lora_rank + c.qk_rope_head_dim) + H * c.kv_lora_rank * c.v_head_dim
                 + H * c.v_head_dim * c.dim)
    return 2 * BT * per_token


def per_head_widths(cfg: MLAConfig) -> set[int]:
    """Sizes of one cached token's per-head keys or values, all heads together (what absorption never builds)."""
    H, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return {H * dn, H * dv, H * (dn + dr), H * (dn + dv)}


def check_step(k, m, cfg: MLAConfig, cache, x1: torch.Tensor, S: int, what: str = "an absorbed decode step",
               peak: bool = True):
    """Fail unless the learner's absorbed decode at position ``S`` (S cached tokens) has the structure of an absorbed step.

    Shapes name the mistake: an intermediate with an S-sized dimension whose other dimensions hold per-head keys or
    values (n_heads x d_h, n_heads x d_v, ...), or one with two S-sized dimensions (an S x S mask or score matrix).
    FLOPs (and, where S x S dominates the memory, the peak bytes of new tensors) bound what the shapes cannot name.
    """
    prof = k.profile(m, x1, S, cache, absorb=True)
    ref_flops = absorbed_decode_flops(cfg, S + 1, batch=x1.shape[0], tokens=x1.shape[1])
    widths = per_head_widths(cfg)
    rebuilt = [s for s in prof.shapes if any(d >= S and _numel(s) // d in widths for d in s)]
    assert_true(not rebuilt, f"{what} at context {S} built an intermediate of shape {rebuilt[0] if rebuilt else ''}: "
                "per-head keys or values of every cached token",
                hint="the absorbed path never multiplies the cached latents by wkv_b, w_uk or w_uv: fold w_uk into the "
                     "new query, attend over c_kv itself, and apply w_uv to the (T, H, d_c) weighted latent")
    square = [s for s in prof.shapes if sum(d >= S for d in s) >= 2]
    assert_true(not square, f"{what} at context {S} built an intermediate of shape {square[0] if square else ''}, "
                "S x S in size",
                hint="the full S x S causal mask (or score matrix) is built at every decode step: a decode step needs only "
                     "the (T, S) rows of its T new queries, causal_mask(T, S)")
    assert_true(prof.flops <= FLOP_FACTOR * ref_flops,
                f"{what} at context {S} costs {prof.flops:,} FLOPs, more than {FLOP_FACTOR}x the course's absorbed "
                f"decode ({ref_flops:,})",
                hint="the absorbed path does O(n_heads (2 d_c + d_h^R)) work per cached token: nothing in it up-projects "
                     "the cache, per head or all heads at once")
    if peak:
        elt = x1.element_size()
        limit = (S + 1) ** 2 * elt // 4
        assert_true(prof.peak_bytes < limit, f"{what} at context {S} held {prof.peak_bytes:,} bytes of new tensors at its "
                    "peak, a quarter of an S x S matrix or more",
                    hint="a decode step needs O(S) memory: (B, H, T, S) scores and views of the cache, nothing S x S")
    return prof


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
