"""Graded benchmark: the learner's absorbed decode against naive recompute-from-latent decode at 2048 cached tokens.

The learner's module and its latent cache stay in the kernel (handles); the judge fills the cache with the
reference's latents of a 2048-token context. Points need outputs that match the reference first, then an
absorbed step with the structure of one (no per-head keys or values, no S x S mask, FLOPs within 1.5x of the
reference's: deterministic), then the speed: batches of fresh one-token inputs sent with ``k.many`` to the
learner's absorbed path, timed by the judge (:func:`course_judge.timing.speedup`) against the course's naive
decode of the same inputs run here in the judge. The slow side never runs in the kernel, so nothing a
submission does there (a slowed-down naive path, a patched library) can widen the ratio; every timed output
is checked against the reference.
"""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Mutant
from course_judge.s02_mla._common import close, randn, single_threaded
from course_judge.s02_mla._decode import check_step, fill
from course_judge.s02_mla.mla import _MASK, _OLAT, build
from course_judge.s02_mla.mla import ALTERNATIVES as _MLA_ALTERNATIVES
from course_judge.timing import speedup
from course_lib.deepseek.attention import MLAConfig

GRADE_ID = "bench_02_absorb"
POINTS = 2
ANSWERS = ("ex_02_4_mla",)
SUMMARY = ("naive and absorbed decode at 2048 cached tokens against the reference; an absorbed step without per-head "
           "keys/values or S x S masks, within 1.5x of the reference's FLOPs; your absorbed decode >= 3x faster than naive "
           "decode, timed by the judge on fresh inputs")
REFERENCE = ("course_lib.deepseek.mla",)

BENCH = MLAConfig(dim=512, n_heads=16, q_lora_rank=192, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, max_seq_len=4097, rope_scaling="none")
CONTEXT = 2048
THRESHOLD = 3.0
PER_BATCH = 3  # decode calls per channel request: spreads the round trip's fixed cost
# float32 gate: outputs ~3e-2; einsum and matmul solutions measured <= 3.2e-8 from the reference
ATOL, RTOL = 2e-6, 1e-4
_ABS_HINT = ("the absorbed decode computes the naive path's function: the same 1/sqrt(d_h + d_h^R) scale, w_uk and w_uv "
             "from absorbed_weights, RoPE angles in float64 at absolute positions")
_NAIVE_HINT = "the naive path over the latent cache: rebuild keys and values from c_kv, RoPE at absolute positions"


@single_threaded
def judge(k, t):
    g = torch.Generator().manual_seed(25)
    ok = False
    with t.part(f"decode at {CONTEXT} cached tokens: naive and absorbed outputs match the reference; the absorbed step builds "
                "no per-head keys/values or S x S mask and stays within 1.5x of the reference's FLOPs", 1):
        m, W, ref = build(k, BENCH, 500, dtype=torch.float32, draw_in_kernel=True)  # 6 MB of weights: drawn in the kernel
        cache, rcache = fill(k, m, ref, BENCH, CONTEXT, CONTEXT + 1, seed=501, dtype=torch.float32)

        def want(x):
            with torch.no_grad():
                return ref(x, CONTEXT, rcache, absorb=True)

        for _ in range(2):
            x = randn(g, 1, 1, BENCH.dim, dtype=torch.float32)
            for ab in (False, True):
                got = k.call_opts(m, [x, CONTEXT, cache], {"absorb": ab}, no_grad=True)
                close(got, want(x), atol=ATOL, rtol=RTOL,
                      name=f"{'absorbed' if ab else 'naive'} decode vs the reference (no points unless outputs agree)",
                      hint=_ABS_HINT if ab else _NAIVE_HINT)
        check_step(k, m, BENCH, cache, randn(g, 1, 1, BENCH.dim, dtype=torch.float32), CONTEXT, peak=False)
        ok = True

    with t.part(f"your absorbed decode at least {THRESHOLD:g}x faster than naive recompute-from-latent at {CONTEXT} cached "
                f"tokens (the course's, timed beside yours by the judge on fresh inputs, {PER_BATCH} calls per round trip)", 1):
        assert_true(ok, "not timed: the decode step did not pass the checks above (correct outputs and an absorbed structure first)")
        record: list = []

        def yours():
            xs = [randn(g, 1, 1, BENCH.dim, dtype=torch.float32) for _ in range(PER_BATCH)]
            record.append((xs, k.many([(m, (x, CONTEXT, cache), {"absorb": True}) for x in xs], no_grad=True)))

        def naive():
            xs = [randn(g, 1, 1, BENCH.dim, dtype=torch.float32) for _ in range(PER_BATCH)]
            with torch.no_grad():
                for x in xs:
                    ref(x, CONTEXT, rcache, absorb=False)

        r = speedup(naive, yours, threshold=THRESHOLD)
        for xs, outs in record:  # every timed call really computed a decode step
            for x, o in zip(xs, outs):
                if isinstance(o, Exception):
                    raise o
                close(expect_tensor(o, "a timed decode step's output"), want(x), atol=ATOL, rtol=RTOL,
                      name="a timed absorbed decode step vs the reference")
        t.note(f"context {CONTEXT}: naive (course) / absorbed (yours) = {r}")
        assert_true(r.ratio >= THRESHOLD, f"your absorbed decode is only {r.ratio:.1f}x faster than naive recompute-from-latent "
                    f"(need >= {THRESHOLD:g}x; {r})",
                    hint="the absorbed path must not multiply the cache by wkv_b; fold W_UK into the (single) new query instead")


MUTANTS = [
    Mutant("absorb ignored (naive decode)", "attend = self.attend_absorbed if absorb else self.attend_naive",
           "attend = self.attend_naive", expect="per-head keys or values"),
    Mutant("absorbed path rebuilds values from w_uv", _OLAT,
           'v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)  # (B, S, H, d_v)\n'
           '        return torch.einsum("bhts,bshd->bthd", p, v), p', expect="per-head keys or values"),
    Mutant("absorbed path rebuilds keys from w_uk", 'scores = torch.einsum("bthc,bsc->bhts", q_lat, c_kv)',
           'scores = torch.einsum("bthd,bshd->bhts", q_nope, torch.einsum("bsc,hdc->bshd", c_kv, w_uk))',
           expect="per-head keys or values"),
    Mutant("full S x S mask sliced at every step", _MASK,
           "mask = causal_mask(c_kv.shape[1], c_kv.shape[1], dtype=x.dtype, device=x.device)[-T:]", expect="S x S"),
    Mutant("absorbed scale 1/sqrt(d_c + d_h^R)", "p = torch.softmax(scores / math.sqrt(self.cfg.qk_head_dim) + mask, dim=-1)",
           "p = torch.softmax(scores / math.sqrt(self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim) + mask, dim=-1)",
           expect="absorbed decode vs the reference"),
    Mutant("w_uk and w_uv swapped in the absorbed path", "w_uk, w_uv = self.decompress.absorbed_weights()  # (H, d_h, d_c), (H, d_v, d_c)",
           "w_uv, w_uk = self.decompress.absorbed_weights()", expect="absorbed decode vs the reference"),
]

ALTERNATIVES = list(_MLA_ALTERNATIVES)
