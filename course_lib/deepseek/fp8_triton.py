"""Triton source of the fused E4M3 quantiser (loaded by :mod:`course_lib.deepseek.fp8_fused`, never imported directly).

One kernel quantises a logical (R, C) matrix ``x[r * sxr + c * sxc]`` (any strides: a transposed view is
read in place) either in 1xBC tiles along C or in BRxBC blocks, writing E4M3 codes and one float32 scale
per tile, with the emulation's arithmetic (``course_lib.deepseek.fp8.quantize_tiles``/``quantize_blocks``).
The E4M3 rounding is done on the float32 bits with integer operations, so the interpreter and the GPU agree.
"""

import triton
import triton.language as tl

AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-4)  # fp8_formats.AMAX_FLOOR (a literal: a jit function reads this file's globals)


@triton.jit
def _encode_e4m3(y):
    """float32 -> E4M3 code (int32 in 0..255): saturating at +-448, ties to even; NaN -> 0x7F with its sign."""
    sign = (y.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
    a = tl.minimum(tl.abs(y), 448.0)
    abits = a.to(tl.int32, bitcast=True)
    normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)  # keep 3 mantissa bits; exponent bias 127 -> 7
    t = a * 512.0  # below 2^-6: multiples of 2^-9 (subnormals; 8 is the smallest normal's code)
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)  # round half to even at 2^23
    code = tl.where(a >= 0.015625, normal, sub)
    code = tl.where(y != y, 0x7F, code)
    return code | (sign << 7)


@triton.jit
def _decode_e4m3(c):
    """E4M3 code (uint8) -> float32."""
    c = c.to(tl.int32) & 0xFF
    e = (c >> 3) & 0xF
    m = c & 7
    normal = ((((c >> 7) & 1) << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where((c >> 7) > 0, -sub, sub)
    v = tl.where(e > 0, normal, sub)
    return tl.where((e == 15) & (m == 7), float("nan"), v)


@triton.jit
def _div(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.math.div_rn(a, b)  # correctly rounded, as torch's division
    return a / b


@triton.jit
def quant_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, R, C, sxr, sxc, sxsr, sxsc, sqr, sqc, ssr, ssc,
                 BLOCKS: tl.constexpr, IN_CODES: tl.constexpr, IN_TR: tl.constexpr, IN_TC: tl.constexpr,
                 PRECISE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Quantise (R, C) in 1xBC tiles (BLOCKS=False: BR rows of tiles per program) or one BRxBC block per program.

    IN_CODES: ``x`` holds E4M3 codes dequantised with ``xs[(r // IN_TR) * sxsr + (c // IN_TC) * sxsc]``.
    Codes go to ``q[r * sqr + c * sqc]`` (uint8), scales to ``s[tile_r * ssr + tile_c * ssc]``.
    """
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    ri = pr * BR + tl.arange(0, BR)
    ci = pc * BC + tl.arange(0, BC)
    r = ri[:, None]
    c = ci[None, :]
    inside = (r < R) & (c < C)
    if IN_CODES:
        code = tl.load(x_ptr + r * sxr + c * sxc, mask=inside, other=0)
        xsc = tl.load(xs_ptr + (r // IN_TR) * sxsr + (c // IN_TC) * sxsc, mask=inside, other=0.0)
        x = _decode_e4m3(code) * xsc
    else:
        x = tl.load(x_ptr + r * sxr + c * sxc, mask=inside, other=0.0).to(tl.float32)
    a = tl.abs(x)
    isnan = (x != x).to(tl.int32)
    if BLOCKS:
        amax = tl.max(tl.max(a, axis=1), axis=0)
        nan = tl.max(tl.max(isnan, axis=1), axis=0)
    else:
        amax = tl.max(a, axis=1)
        nan = tl.max(isnan, axis=1)
    s = _div(tl.maximum(amax, AMAX_FLOOR), 448.0, PRECISE)
    s = tl.where(nan > 0, float("nan"), s)  # a NaN stays inside its tile, as torch's amax propagates it
    if BLOCKS:
        y = _div(x, s, PRECISE)
        tl.store(s_ptr + pr * ssr + pc * ssc, s)
    else:
        y = _div(x, s[:, None], PRECISE)
        tl.store(s_ptr + ri * ssr + pc * ssc, s, mask=ri < R)
    tl.store(q_ptr + r * sqr + c * sqc, _encode_e4m3(y).to(tl.uint8), mask=inside)
