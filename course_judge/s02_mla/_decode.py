"""Structural checks of one absorbed decode step (shared by exercise 2.4 and the absorption benchmark).

The learner's module decodes one token against a filled latent cache under the kernel's profiler; the
course's reference does the same step here. A decode step must not rebuild per-head keys or values of the
cached tokens (no (B, S, H, d_v)-like intermediate), must not build an S x S mask, and its FLOPs must stay
within 1.5x of the reference's. All of these are deterministic, unlike a timing.
"""

from __future__ import annotations

import torch

from course_judge.checks import assert_true
from course_lib.agent import profile as _profile
from course_lib.deepseek.attention import MLAConfig
from course_lib.deepseek.common import rope_angles

FLOP_FACTOR = 1.5


def fill(k, m, ref, cfg: MLAConfig, x_ctx: torch.Tensor, max_seq_len: int):
    """The learner's and the reference's latent caches, both holding the reference's latents of ``x_ctx``."""
    S = x_ctx.shape[1]
    a = rope_angles(torch.arange(S), cfg.qk_rope_head_dim, cfg.rope_theta, dtype=torch.float64)
    with torch.no_grad():
        c_kv, k_pe = ref.latent(x_ctx, a)
    rcache = ref.new_cache(x_ctx.shape[0], max_seq_len)
    rcache.update(0, c_kv, k_pe)
    cache = k.call(m.new_cache, x_ctx.shape[0], max_seq_len)
    k.call_opts(cache.update, [0, c_kv, k_pe], keep=True, no_grad=True)  # the views stay in the kernel
    return cache, rcache


def per_head_widths(cfg: MLAConfig) -> set[int]:
    """Sizes of one cached token's per-head keys or values, all heads together (what absorption never builds)."""
    H, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return {H * dn, H * dv, H * (dn + dr), H * (dn + dv)}


def check_step(k, m, ref, cfg: MLAConfig, cache, rcache, x1: torch.Tensor, S: int, what: str = "an absorbed decode step",
               peak: bool = True):
    """Fail unless the learner's absorbed decode at position ``S`` (S cached tokens) has the structure of an absorbed step.

    Shapes name the mistake: an intermediate with an S-sized dimension whose other dimensions hold per-head keys or
    values (n_heads x d_h, n_heads x d_v, ...), or one with two S-sized dimensions (an S x S mask or score matrix).
    FLOPs (and, where S x S dominates the memory, the peak bytes of new tensors) bound what the shapes cannot name.
    """
    prof = k.profile(m, x1, S, cache, absorb=True)
    with torch.no_grad():
        mine = _profile(ref, [x1, S, rcache], {"absorb": True})
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
    assert_true(prof.flops <= FLOP_FACTOR * mine["flops"],
                f"{what} at context {S} costs {prof.flops:,} FLOPs, more than {FLOP_FACTOR}x the course's absorbed "
                f"decode ({mine['flops']:,})",
                hint="the absorbed path does O(n_heads (2 d_c + d_h^R)) work per cached token: nothing in it up-projects "
                     "the cache, per head or all heads at once")
    if peak:
        elt = x1.element_size()
        limit = (S + 1) ** 2 * elt // 4
        assert_true(prof.peak_bytes < limit, f"{what} at context {S} held {prof.peak_bytes:,} bytes of new tensors at its "
                    f"peak, a quarter of an S x S matrix or more (the course's absorbed decode: {mine['peak_bytes']:,})",
                    hint="a decode step needs O(S) memory: (B, H, T, S) scores and views of the cache, nothing S x S")
    return prof, mine


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
