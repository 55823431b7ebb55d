"""Exercise 4.1 (GEMM): the fine-grained FP8 GEMM and the limited-precision accumulator with FP32 promotion."""

from __future__ import annotations

from functools import partial

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8._common import close
from course_lib.deepseek import fp8 as ref
from course_lib.deepseek.fp8_formats import N_C, round_to_bits

GRADE_ID = "test_04_1_gemm"
POINTS = 4.5
ANSWERS = ("ex_04_1_gemm",)
SUMMARY = ("fp8_gemm with 1x128 x 128x128 and 1x128 x 1x128 scales against dequantise-then-matmul in float64 (odd M); "
           "accumulate against the reference simulation: truncation after every addition, promotion every N_C = 128 "
           "(and every promote_every), the last partial sum; the error falls >5x with promotion")
REFERENCE = ("course_lib.deepseek.fp8",)

T = 128
NEVER_PROMOTES = ("never promotes: with promote_every=N_C (128) the limited accumulator must hand its partial sum to the FP32 "
                  "total every N_C products and restart from 0")


def _deq(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return ref.dequantize(q, s).double()


def _gemm_variants(aq, as_, bq, bs) -> dict[str, torch.Tensor]:
    """Outputs of fp8_gemm with one known mistake each (float64)."""
    a, b = aq.double(), bq.double()
    M, K = a.shape
    N = b.shape[0]
    sb = bs.double().repeat_interleave(T, dim=0) if bs.shape[0] != N else bs.double()  # (N, K/128)
    sa = as_.double()
    KB = K // T

    def per_slice(sa_, sb_, op="mul"):
        y = torch.zeros(M, N, dtype=torch.float64)
        for k in range(KB):
            p = a[:, k * T:(k + 1) * T] @ b[:, k * T:(k + 1) * T].T
            y += p * sa_[:, k, None] * sb_[None, :, k] if op == "mul" else p / sa_[:, k, None] / sb_[None, :, k]
        return y

    out = {
        "the scales are ignored: multiply each K-slice's partial product by a_s[:, k] and b_s[:, k]": a @ b.T,
        "the scales divide: they are dequantisation factors, multiply each K-slice's partial product by them": per_slice(sa, sb, "div"),
        "only a's scales are applied: each K-slice needs a_s[:, k] x b_s[:, k]": per_slice(sa, torch.ones_like(sb)),
        "only b's scales are applied: each K-slice needs a_s[:, k] x b_s[:, k]": per_slice(torch.ones_like(sa), sb),
        "one scale pair for the whole product (the first K-slice's): the scales change along K, apply them per 128-wide slice":
            (a @ b.T) * sa[:, :1] * sb[None, :, 0],
    }
    if bs.shape[0] != N:
        out["each row n of B belongs to block n // 128: expand the block scales with repeat_interleave, not repeat"] = \
            per_slice(sa, bs.double().repeat(N // bs.shape[0], 1))
    return out


def _acc_variant(a, b, bits, promote_every, *, mode="truncate", drop_last=False, per_product=False):
    """accumulate with one known mistake (float32, sequential like the reference)."""
    M, K = a.shape
    N = b.shape[0]
    chunk = promote_every or K
    total = torch.zeros(M, N)
    acc = torch.zeros(M, N)
    for k in range(K):
        p = a[:, k, None] * b[None, :, k]
        acc = acc + round_to_bits(p, bits, mode) if per_product else round_to_bits(acc + p, bits, mode)
        if (k + 1) % chunk == 0 or (k == K - 1 and not drop_last):
            total = total + acc
            acc = torch.zeros(M, N)
    return total


def _acc_mistakes(a, b, bits, pe) -> dict[str, torch.Tensor]:
    out = {}
    if pe is not None:
        out[NEVER_PROMOTES] = ref.accumulate_limited(a, b, bits, None)
        for n in (pe // 2, pe - 1, pe + 1, 2 * pe, N_C):
            if n != pe:
                out.setdefault(f"promotes at the wrong interval (every {n} products): restart the limited accumulator every "
                               f"promote_every = {pe} products (DeepSeek: N_C = 128)", ref.accumulate_limited(a, b, bits, n))
        out["the last partial sum is never added to the FP32 total: promote after the final product too (K is not a multiple "
            "of promote_every here)"] = _acc_variant(a, b, bits, pe, drop_last=True)
    else:
        out["promotes although promote_every=None: then one limited accumulator runs over all of K"] = \
            ref.accumulate_limited(a, b, bits, N_C)
    out["the running sum is rounded to nearest: the limited accumulator truncates (round_to_bits(..., 'truncate'))"] = \
        ref.accumulate_limited(a, b, bits, pe, mode="nearest")
    out["the running sum is not rounded to mantissa_bits after each addition (a plain FP32 sum)"] = \
        ref.accumulate_limited(a, b, 23, pe, mode="nearest")
    out["each product is rounded instead of the running sum: round acc + product after every addition"] = \
        _acc_variant(a, b, bits, pe, per_product=True)
    return out


def _fp8_values(x: torch.Tensor) -> torch.Tensor:
    return ref.round_to_format(x)


def judge(k, t):
    gemm, acc = k.g.fp8_gemm, k.g.accumulate
    with t.part("visible checks: fp8_gemm against dequantise-then-matmul, accumulate with 23 bits", 1.5):
        torch.manual_seed(2)
        a_q, a_s = ref.quantize_tiles(torch.randn(16, 256))
        b_q, b_s = ref.quantize_blocks(torch.randn(128, 256))
        y = expect_tensor(gemm(a_q, a_s, b_q, b_s), "fp8_gemm output", shape=(16, 128))
        want = _deq(a_q, a_s) @ _deq(b_q, b_s).T
        close(y, want, atol=1e-4, rtol=1e-5, name="fp8_gemm vs dequantise-then-matmul",
              mistakes=partial(_gemm_variants, a_q, a_s, b_q, b_s), mistake_rel=1e-4,
              hint="multiply each K-slice's partial product by a_s[:, k] and b_s[:, k] before adding it up")
        a8, b8 = a_q[:4].float(), b_q[:3].float()
        got = expect_tensor(acc(a8, b8, mantissa_bits=23, promote_every=None), "accumulate(..., 23 bits)", shape=(4, 3))
        close(got, (a8.double() @ b8.double().T).float(), atol=1e-3, rtol=1e-5, name="accumulate with 23 bits",
              hint="add the products a[:, k] b[:, k] in order, rounding the running sum after each addition")

    g = torch.Generator().manual_seed(43)
    with t.part("fp8_gemm: 1x128 tiles x 128x128 blocks and 1x128 x 1x128 (Wgrad) against float64, M = 200", 1.5):
        a = torch.randn(200, 640, generator=g) * torch.linspace(0.01, 100, 640)  # scales that change along K
        b = torch.randn(384, 640, generator=g) * torch.linspace(10, 0.1, 384)[:, None]
        aq, as_ = ref.quantize_tiles(a)
        bq, bs = ref.quantize_blocks(b)
        want = _deq(aq, as_) @ _deq(bq, bs).T
        y = expect_tensor(gemm(aq, as_, bq, bs), "fp8_gemm(tiles, blocks)", shape=(200, 384))
        assert_true(y.dtype == torch.float32, f"fp8_gemm should return float32, got {y.dtype}")
        close(y, want, atol=1e-5 * float(want.abs().max()), name="blockwise GEMM vs dequantise-then-matmul (float64)",
              mistakes=partial(_gemm_variants, aq, as_, bq, bs), mistake_rel=1e-4,
              hint="y += (a_q[:, k] @ b_q[:, k]^T) * a_s[:, k] * b_s[:, k] per K-slice")
        btq, bts = ref.quantize_tiles(b)
        want = _deq(aq, as_) @ _deq(btq, bts).T
        y = expect_tensor(gemm(aq, as_, btq, bts), "fp8_gemm(tiles, tiles)", shape=(200, 384))
        close(y, want, atol=1e-5 * float(want.abs().max()), name="tile x tile GEMM (b_s of shape (N, K/128))",
              mistakes=partial(_gemm_variants, aq, as_, btq, bts), mistake_rel=1e-4,
              hint="b_s may be (N, K/128): one scale per row and K-slice, no expansion")

    with t.part("accumulate: truncation after every addition, promotion every promote_every (N_C = 128), the last partial sum; "
                "the error falls >5x with promotion", 1.5):
        x8 = _fp8_values(torch.randn(6, 520, generator=g) * 4)
        w8 = _fp8_values(torch.randn(5, 520, generator=g) * 4)
        for pe in (N_C, None, 256):
            got = expect_tensor(acc(x8, w8, 14, pe), f"accumulate(a, b, 14, promote_every={pe})", shape=(6, 5))
            want = ref.accumulate_limited(x8, w8, 14, pe)
            close(got, want, atol=0, rtol=1e-6, name=f"accumulate(K=520, 14 bits, promote_every={pe}) vs the reference simulation",
                  mistakes=partial(_acc_mistakes, x8, w8, 14, pe),
                  hint="acc = round_to_bits(acc + a[:, k, None] * b[None, :, k], bits, 'truncate') in order k = 0 .. K-1")
        x8 = _fp8_values(torch.randn(8, 1024, generator=g) * 4)
        w8 = _fp8_values(torch.randn(8, 1024, generator=g) * 4)
        exact = x8.double() @ w8.double().T
        den = x8.abs().double() @ w8.abs().double().T
        e_none = float(((acc(x8, w8, 14, None) - exact).abs() / den).max())
        e_prom = float(((acc(x8, w8, 14, N_C) - exact).abs() / den).max())
        assert_true(e_none > 5 * e_prom, f"promotion every 128 should cut the accumulation error by >5x at K=1024 (the reference: ~15x): "
                    f"{e_none:.2e} without vs {e_prom:.2e} with promotion", hint=NEVER_PROMOTES)


_SLICE = "y += (a[:, sl] @ b[:, sl].T) * a_s[:, k, None] * b_s[None, :, k]"

MUTANTS = [
    Mutant("never promotes", "chunk = promote_every or K", "chunk = K", expect="never promotes"),
    Mutant("promotes at the wrong interval", "chunk = promote_every or K", "chunk = promote_every + 1 if promote_every else K",
           expect="promotes at the wrong interval"),
    Mutant("promotion hard-coded to 128", "chunk = promote_every or K", "chunk = 128 if promote_every else K",
           expect="promotes at the wrong interval (every 128"),
    Mutant("last partial sum dropped", "if (k + 1) % chunk == 0 or k == K - 1:", "if (k + 1) % chunk == 0:",
           expect="never added to the FP32 total"),
    Mutant("rounds to nearest", 'mantissa_bits, "truncate")', 'mantissa_bits, "nearest")', count=2, expect="truncates"),
    Mutant("accumulator not rounded", 'acc = round_to_bits(acc + a[:, k, None] * b[None, :, k], mantissa_bits, "truncate")',
           "acc = acc + a[:, k, None] * b[None, :, k]", count=2, expect="not rounded to mantissa_bits"),
    Mutant("scales ignored", _SLICE, "y += a[:, sl] @ b[:, sl].T", expect="scales are ignored"),
    Mutant("block scales expanded with repeat", "b_s = b_s.repeat_interleave(block, dim=0)", "b_s = b_s.repeat(block, 1)",
           expect="block n // 128"),
    Mutant("scales divide", _SLICE, "y += (a[:, sl] @ b[:, sl].T) / a_s[:, k, None] / b_s[None, :, k]", expect="scales divide"),
    Mutant("one scale pair for the whole product", _SLICE, "y += (a[:, sl] @ b[:, sl].T) * a_s[:, :1] * b_s[None, :, 0]",
           expect="one scale pair"),
]

ALTERNATIVES = [
    Alternative("einsum over K-slices; the accumulator vectorised over chunks", source='''
def fp8_gemm(a_q, a_s, b_q, b_s, block=128):
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = K // block
    sb = b_s if b_s.shape[0] == N else b_s[torch.arange(N) // block]  # (N, K/block): the block of each row
    a = a_q.to(torch.float32).reshape(M, KB, block)
    b = b_q.to(torch.float32).reshape(N, KB, block)
    partial = torch.einsum("mkb,nkb->kmn", a, b)  # (K/block, M, N): one partial product per K-slice
    return (partial * a_s.T[:, :, None] * sb.T[:, None, :]).sum(0)


def accumulate(a, b, mantissa_bits=14, promote_every=None):
    M, K = a.shape
    N = b.shape[0]
    chunk = promote_every or K
    C = -(-K // chunk)
    pad = C * chunk - K
    ap = torch.nn.functional.pad(a, (0, pad)).reshape(M, C, chunk)
    bp = torch.nn.functional.pad(b, (0, pad)).reshape(N, C, chunk)
    acc = torch.zeros(C, M, N)  # one limited accumulator per chunk, all running at once
    for i in range(chunk):
        acc = round_to_bits(acc + ap[:, :, i].T[:, :, None] * bp[:, :, i].T[:, None, :], mantissa_bits, "truncate")
    total = torch.zeros(M, N)
    for c in range(C):  # promotion, chunk by chunk, in FP32
        total = total + acc[c]
    return total
'''),
]
