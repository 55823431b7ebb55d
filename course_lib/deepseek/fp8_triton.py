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
def _load(x_ptr, xs_ptr, r, c, inside, sxr, sxc, sxsr, sxsc, IN_CODES: tl.constexpr, IN_TR: tl.constexpr, IN_TC: tl.constexpr):
    """The float32 values at logical (r, c); 0 outside. IN_CODES: E4M3 codes times their scale."""
    if IN_CODES:
        code = tl.load(x_ptr + r * sxr + c * sxc, mask=inside, other=0)
        xsc = tl.load(xs_ptr + (r // IN_TR) * sxsr + (c // IN_TC) * sxsc, mask=inside, other=0.0)
        return _decode_e4m3(code) * xsc
    return tl.load(x_ptr + r * sxr + c * sxc, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _scale(amax, nan, PRECISE: tl.constexpr):
    """max(amax, 1e-4) / 448, NaN where the tile holds a NaN (as torch's amax propagates it)."""
    s = _div(tl.maximum(amax, AMAX_FLOOR), 448.0, PRECISE)
    return tl.where(nan > 0, float("nan"), s)


@triton.jit
def quant_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, R, C, sxr, sxc, sxsr, sxsc, sqr, sqc, ssr, ssc,
                 BLOCKS: tl.constexpr, IN_CODES: tl.constexpr, IN_TR: tl.constexpr, IN_TC: tl.constexpr,
                 PRECISE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SUB: tl.constexpr):
    """Quantise (R, C) in 1xBC tiles (BLOCKS=False: BR rows of tiles per program) or one BRxBC block per program
    (read in slices of SUB rows twice: amax, then the codes; a whole 128x128 block in registers compiles slowly).

    IN_CODES: ``x`` holds E4M3 codes dequantised with ``xs[(r // IN_TR) * sxsr + (c // IN_TC) * sxsc]``.
    Codes go to ``q[r * sqr + c * sqc]`` (uint8), scales to ``s[tile_r * ssr + tile_c * ssc]``.
    """
    pr = tl.program_id(0)
    pc = tl.program_id(1)
    ci = pc * BC + tl.arange(0, BC)
    c = ci[None, :]
    if BLOCKS:
        amax = tl.full((), 0.0, tl.float32)
        nan = tl.full((), 0, tl.int32)
        for i in range(0, BR, SUB):
            r = (pr * BR + i + tl.arange(0, SUB))[:, None]
            x = _load(x_ptr, xs_ptr, r, c, (r < R) & (c < C), sxr, sxc, sxsr, sxsc, IN_CODES, IN_TR, IN_TC)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
            nan = tl.maximum(nan, tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0))
        s = _scale(amax, nan, PRECISE)
        tl.store(s_ptr + pr * ssr + pc * ssc, s)
        for i in range(0, BR, SUB):
            r = (pr * BR + i + tl.arange(0, SUB))[:, None]
            inside = (r < R) & (c < C)
            x = _load(x_ptr, xs_ptr, r, c, inside, sxr, sxc, sxsr, sxsc, IN_CODES, IN_TR, IN_TC)
            tl.store(q_ptr + r * sqr + c * sqc, _encode_e4m3(_div(x, s, PRECISE)).to(tl.uint8), mask=inside)
    else:
        ri = pr * BR + tl.arange(0, BR)
        r = ri[:, None]
        inside = (r < R) & (c < C)
        x = _load(x_ptr, xs_ptr, r, c, inside, sxr, sxc, sxsr, sxsc, IN_CODES, IN_TR, IN_TC)
        s = _scale(tl.max(tl.abs(x), axis=1), tl.max((x != x).to(tl.int32), axis=1), PRECISE)  # (BR,)
        tl.store(s_ptr + ri * ssr + pc * ssc, s, mask=ri < R)
        tl.store(q_ptr + r * sqr + c * sqc, _encode_e4m3(_div(x, s[:, None], PRECISE)).to(tl.uint8), mask=inside)
