# %% [markdown]
# # Section 4 — FP8 mixed-precision training (30 min)
#
# DeepSeek-V3 was the first model at its scale trained with **FP8 GEMMs**: every large matrix product of
# the forward pass (Fprop) and of both backward GEMMs (Dgrad, Wgrad) reads 8-bit floats. That halves the
# bytes each GEMM moves compared to BF16 and, on Hopper tensor cores, raises peak throughput. Eight bits
# hold a 3-bit mantissa and a 4-bit exponent, so the recipe lives or dies by **scaling**: DeepSeek gives every
# 1x128 tile of activations and every 128x128 block of weights its own scale, and promotes partial sums
# to FP32 every 128 products. The paper reports a training loss within 0.25 % of the BF16 baseline.
#
# **You will**
# - encode and decode E4M3/E5M2 at the bit level (round-to-nearest-even, subnormals, saturation, NaN) and
#   match torch's `float8` dtypes on all 256 codes;
# - quantise with per-tensor, per-1x128-tile and per-128x128-block scales and measure why tiles win when
#   activations have outliers;
# - emulate DeepSeek's fine-grained FP8 GEMM, and show the accumulation error growing with K until partial
#   sums are promoted to FP32;
# - write an FP8 linear layer whose Fprop, Dgrad and Wgrad all run on FP8 inputs, a mixed-precision trainer
#   (BF16 autocast, FP16 with dynamic loss scaling) and a stability monitor.
#
# **Time:** 30 minutes (4.1: 10, 4.2: 15, 4.3: 5). **Prerequisites:** floating-point representation
# (Section 1.4), autograd (`torch.autograd.Function`), a training loop.
#
# *For instructors:* the seed's 4.1 (FP8 conversion utilities) is split into four graded parts — codec,
# quantiser, GEMM, linear layer — because each is a separate skill with its own failure modes; the
# seed's 4.2 and 4.3 follow the template unchanged.

# %% [given]
import torch
from course_lib.utils import setup, sizes
ENV = setup(seed=0)
print(ENV)

# %% [given]
import math
from collections import defaultdict, deque
import contextlib
import time

import matplotlib.pyplot as plt
import numpy as np
import torch.nn.functional as F
from torch import nn

from course_lib import viz
from course_lib.deepseek.common import RMSNorm, SwiGLU
from course_lib.deepseek.fp8_formats import E4M3, E5M2, FORMATS, FP8Format, round_to_bits, sqnr_db

# This section's tensors are small (128-wide tiles): one thread runs them faster than two, and is not slowed
# down by other processes competing for the cores.
torch.set_num_threads(1)


def yours_or_placeholder(figure, what):
    """Run ``figure()`` (a figure or table built with your code); while the exercise it needs is unfinished
    (NotImplementedError), print one line instead."""
    try:
        return figure()
    except NotImplementedError:
        print(f"(finish {what} to see this figure)")
        return None


for f in (E4M3, E5M2):
    print(f"{f.name}: {f.exp_bits} exponent bits (bias {f.bias}), {f.man_bits} mantissa bits, max {f.max:g}, "
          f"min normal 2^{int(math.log2(f.min_normal))}, min subnormal 2^{int(math.log2(f.min_subnormal))}, "
          f"inf: {'yes' if f.has_inf else 'no'}, torch dtype {f.torch_dtype}")

# %% [markdown]
# ## 4.1 FP8 conversion utilities
#
# ### 4.1.1 Two 8-bit formats
#
# An FP8 code is one sign bit $s$, an exponent field $e$ and a mantissa field $m$ of $M$ bits:
#
# $$
# x = (-1)^s \cdot 2^{\,e-\text{bias}} \cdot \Bigl(1 + \frac{m}{2^M}\Bigr) \quad (e > 0,\ \text{normal}),
# \qquad
# x = (-1)^s \cdot 2^{\,1-\text{bias}} \cdot \frac{m}{2^M} \quad (e = 0,\ \text{subnormal}).
# $$
#
# ```
#  E4M3   | s | e e e e | m m m |     bias 7,  max 448 = 2^8 x 1.75 (S.1111.110), min normal 2^-6, min subnormal 2^-9
#  E5M2   | s | e e e e e | m m |     bias 15, max 57344 = 2^15 x 1.75,            min normal 2^-14, min subnormal 2^-16
# ```
#
# E5M2 keeps IEEE's special codes (all-ones exponent: $\pm\infty$ when $m=0$, NaN otherwise). E4M3 ("fn":
# finite, NaN-only) gives them up to reach 448 instead of 240: its only NaN is `S.1111.111`, and it has **no
# infinity** — an overflow must *saturate* to $\pm 448$. Torch versions differ in what a plain cast does on
# overflow (saturate or NaN), so DeepSeek's recipe, and yours, **clamps to $\pm$max before every cast**.
#
# *Intuition:* each binade $[2^k, 2^{k+1})$ is a ruler with $2^M$ ticks — 8 for E4M3, 4 for E5M2 — so the
# relative spacing is the same everywhere: $2^{-M}$, i.e. at most $2^{-(M+1)}$ = 6.25 % (E4M3) rounding
# error. Below the smallest normal the ticks stay evenly spaced (subnormals) and the relative error grows.
#
# **Rounding.** A value between two ticks goes to the nearer one; an exact tie goes to the code whose
# mantissa is even (last bit 0) — *round half to even*, which `torch.round` implements.
#
# **Scaled quantisation.** To use the few ticks well, divide a block of values by a scale so that its
# largest magnitude lands on the format's maximum (DeepSeek-V3 section 3.3; `amax` floored at $10^{-4}$ so
# an all-zero block stays finite):
#
# $$ s = \frac{\max(\operatorname{amax}, 10^{-4})}{448}, \qquad x_q = \operatorname{E4M3}\bigl(\operatorname{clamp}(x / s, -448, 448)\bigr),
# \qquad \hat x = x_q \cdot s. $$
#
# DeepSeek uses one scale per **1x128 tile** of activations (a row segment of 128 channels of one token) and
# one per **128x128 block** of weights:
#
# ```
#  activation x (M tokens, K channels)           weight W (N outputs, K inputs)
#  +------+------+------+---                     +--------+--------+---
#  | s00  | s01  | s02  |   <- one scale per     |  s00   |  s01   |     <- one scale per
#  +------+------+------+---    1 x 128 tile     |        |        |        128 x 128 block
#  | s10  | s11  | s12  |                        +--------+--------+---
#  ...  scales: (M, K/128)                        ...  scales: (N/128, K/128)
# ```
#
# Implement `FP8Converter`: `decode` and `encode` at the **bit level** (integer and float arithmetic on
# ordinary tensors; the tests compare you against torch's float8 dtypes, so don't use them here), then
# `quantize` and `dequantize` with scales (there, cast with `.to(fmt.torch_dtype)` after clamping).

# %% [solution id=ex_04_1_converter]
class FP8Converter:
    """Precision conversion with scaling: a bit-level FP8 codec and fine-grained scaled quantisation."""

    def __init__(self, fmt: FP8Format | str = "e4m3", tile: int = 128, amax_floor: float = 1e-4) -> None:
        self.fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        self.tile = tile
        self.amax_floor = amax_floor

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Values of 8-bit codes.

        codes: integer tensor (uint8) of any shape, each entry one code 0..255.
        Returns float32, same shape: the normal/subnormal formulas above, -0.0 for code 0x80, NaN for the
        format's NaN codes, +-inf for E5M2's infinity codes.
        """
        ### BEGIN SOLUTION
        f = self.fmt
        c = codes.to(torch.int64) & 0xFF
        sign = c >> 7
        e = (c >> f.man_bits) & ((1 << f.exp_bits) - 1)  # exponent field
        m = (c & ((1 << f.man_bits) - 1)).to(torch.float64)  # mantissa field
        frac = m / 2**f.man_bits
        normal = (1.0 + frac) * torch.exp2((e - f.bias).to(torch.float64))
        subnormal = frac * 2.0 ** (1 - f.bias)
        mag = torch.where(e > 0, normal, subnormal)
        e_ones = (1 << f.exp_bits) - 1
        if f.has_inf:  # E5M2: IEEE-style specials
            mag = torch.where((e == e_ones) & (m == 0), math.inf, mag)
            mag = torch.where((e == e_ones) & (m > 0), math.nan, mag)
        else:  # E4M3: only S.1111.111 is special (NaN)
            mag = torch.where((e == e_ones) & (m == 2**f.man_bits - 1), math.nan, mag)
        return torch.where(sign == 1, -mag, mag).to(torch.float32)
        ### END SOLUTION

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        """Codes of ``x`` rounded to the nearest representable value, ties to the even mantissa.

        x: float tensor of any shape (read exactly in float64). Returns uint8 codes, same shape.
        saturate=True: clamp to +-max first (infinities too). saturate=False: magnitudes that round above max
        become inf (E5M2, code S.11111.00) or NaN (E4M3, code S.1111.111). NaN maps to a NaN code.
        """
        ### BEGIN SOLUTION
        f = self.fmt
        x = x.detach().to(torch.float64)
        sign = torch.signbit(x).to(torch.int64)
        a = x.abs()
        if saturate:
            a = a.clamp(max=f.max)
        _, exp = torch.frexp(a)  # a = frac * 2^exp with frac in [0.5, 1)
        e = (exp.to(torch.int64) - 1).clamp(min=1 - f.bias)  # binade; subnormals share the lowest one
        step = torch.exp2((e - f.man_bits).to(torch.float64))  # tick spacing in that binade
        q = torch.round(a / step) * step  # round half to even
        ok = q <= f.max  # False for overflow, inf and NaN
        q = torch.where(ok, q, torch.zeros_like(q))
        _, exp_q = torch.frexp(q)  # rounding may carry into the next binade
        e_q = exp_q.to(torch.int64) - 1
        normal = q >= f.min_normal
        exp_field = torch.where(normal, e_q + f.bias, torch.zeros_like(e_q))
        mant = torch.where(normal, (q / torch.exp2(e_q.to(torch.float64)) - 1.0) * 2**f.man_bits, q / f.min_subnormal)
        code = (sign << 7) | (exp_field << f.man_bits) | mant.round().to(torch.int64)
        e_ones = (1 << f.exp_bits) - 1
        overflow = (e_ones << f.man_bits) if f.has_inf else 0x7F  # inf for E5M2, NaN for E4M3
        code = torch.where(ok, code, (sign << 7) | overflow)
        code = torch.where(torch.isnan(x), (sign << 7) | 0x7F, code)
        return code.to(torch.uint8)
        ### END SOLUTION

    def _check(self, x: torch.Tensor, granularity: str) -> None:
        t = self.tile
        if granularity not in ("tensor", "tile", "block"):
            raise ValueError(f"granularity must be 'tensor', 'tile' or 'block', got {granularity!r}")
        if granularity == "tile" and (x.dim() != 2 or x.shape[1] % t):
            raise ValueError(f"tile quantisation expects (M, K) with K a multiple of {t}, got {tuple(x.shape)}")
        if granularity == "block" and (x.dim() != 2 or x.shape[0] % t or x.shape[1] % t):
            raise ValueError(f"block quantisation expects (N, K), both multiples of {t}, got {tuple(x.shape)}")

    def quantize(self, x: torch.Tensor, granularity: str = "tile", scale: torch.Tensor | None = None):
        """Scaled quantisation: returns ``(x_q, scale)`` with ``x ~ x_q * scale``.

        x: float tensor. granularity:
          "tensor": any shape, scale shape ()                      (one scale for everything)
          "tile":   x (M, K), scale (M, K / tile)                  (1 x tile: DeepSeek's activations)
          "block":  x (N, K), scale (N / tile, K / tile)           (tile x tile: DeepSeek's weights)
        scale = max(amax of the group, amax_floor) / fmt.max, float32; pass ``scale`` (same shape) to reuse a
        precomputed one (delayed scaling). x_q = clamp(x / scale, -max, max) cast to fmt.torch_dtype.
        """
        self._check(x, granularity)
        ### BEGIN SOLUTION
        f, t = self.fmt, self.tile
        x = x.to(torch.float32)
        if granularity == "tensor":
            if scale is None:
                scale = x.abs().amax().clamp_min(self.amax_floor) / f.max
            return (x / scale).clamp(-f.max, f.max).to(f.torch_dtype), scale
        M, K = x.shape
        if granularity == "tile":
            xb = x.reshape(M, K // t, t)  # (M, K/t, t)
            if scale is None:
                scale = xb.abs().amax(dim=-1).clamp_min(self.amax_floor) / f.max  # (M, K/t)
            q = (xb / scale[:, :, None]).clamp(-f.max, f.max)
        else:
            xb = x.reshape(M // t, t, K // t, t)  # (M/t, t, K/t, t)
            if scale is None:
                scale = xb.abs().amax(dim=(1, 3)).clamp_min(self.amax_floor) / f.max  # (M/t, K/t)
            q = (xb / scale[:, None, :, None]).clamp(-f.max, f.max)
        return q.reshape(M, K).to(f.torch_dtype), scale
        ### END SOLUTION

    def dequantize(self, x_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 ``x_q * scale``, the scale broadcast over its tensor, 1 x tile tile or tile x tile block.

        x_q: FP8 tensor; scale: () or (M, K / tile) or (M / tile, K / tile) as returned by ``quantize``.
        """
        ### BEGIN SOLUTION
        t = self.tile
        xf = x_q.to(torch.float32)
        if scale.dim() == 0:
            return xf * scale
        M, _ = x_q.shape
        s = scale if scale.shape[0] == M else scale.repeat_interleave(t, dim=0)  # (M, K/t)
        return xf * s.repeat_interleave(t, dim=1)  # (M, K)
        ### END SOLUTION


# %% [test id=test_04_1_codec points=1]
from course_lib.testing import assert_close, assert_true

conv = FP8Converter("e4m3")
codes = conv.encode(torch.tensor([1.0, -2.0, 448.0, 0.0, 2.0**-9]))
assert_true(codes.dtype == torch.uint8, f"encode should return uint8 codes, got {codes.dtype}")
assert_true(codes.tolist() == [0x38, 0xC0, 0x7E, 0x00, 0x01],
            f"E4M3 codes of [1, -2, 448, 0, 2^-9] should be [0x38, 0xc0, 0x7e, 0x0, 0x1], got {[hex(c) for c in codes.tolist()]}",
            hint="sign in bit 7, exponent field (bias 7) in bits 6-3, mantissa in bits 2-0; 2^-9 is subnormal")
vals = conv.decode(torch.tensor([0x38, 0x01, 0x08, 0x7E, 0xB8], dtype=torch.uint8))
assert_close(vals, torch.tensor([1.0, 2.0**-9, 2.0**-6, 448.0, -1.0]), atol=0, rtol=0, name="decoded E4M3 values")
assert_true(bool(torch.isnan(conv.decode(torch.tensor([0x7F], dtype=torch.uint8))).all()), "0x7f is E4M3's NaN")
assert_true(conv.encode(torch.tensor([1 + 1 / 16])).item() == 0x38,
            "1 + 1/16 lies halfway between 1.0 (mantissa 000) and 1.125 (001): ties go to the even mantissa",
            hint="use torch.round (half to even) on x / spacing, not floor(x + 0.5)")
assert_true(conv.encode(torch.tensor([1000.0])).item() == 0x7E, "1000 must saturate to 448 (0x7e) when saturate=True")
print("codec: visible checks passed")

# %% [test id=test_04_1_codec_hidden points=3]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import math as _m
import torch as _t
from course_lib.deepseek.fp8 import E4M3 as _E4M3, E5M2 as _E5M2
from course_lib.testing import assert_true as _at


def _code_names(fn):
    """Global and attribute names a function's bytecode uses (nested functions included)."""
    names, todo = set(), [fn.__code__]
    while todo:
        co = todo.pop()
        names |= set(co.co_names)
        todo += [c for c in co.co_consts if hasattr(c, "co_names")]
    return names


def _same(a, b):
    return (_t.isnan(a) & _t.isnan(b)) | ((a == b) & (_t.signbit(a) == _t.signbit(b)))


_codes = _t.arange(256).to(_t.uint8)
for _f in (_E4M3, _E5M2):
    _c = FP8Converter(_f.name)
    # all 256 codes against torch's own float8 dtype (independent oracle)
    _want = _codes.view(_f.torch_dtype).to(_t.float32)
    _got = _c.decode(_codes)
    _bad = ~_same(_got, _want)
    _at(not bool(_bad.any()), f"{_f.name}: decode disagrees with torch on codes {[hex(v) for v in _codes[_bad].tolist()][:8]}: "
        f"got {_got[_bad].tolist()[:8]}, torch {_want[_bad].tolist()[:8]}",
        hint="subnormals (exponent field 0) are 2^(1-bias) * m / 2^M; check the NaN/inf codes of the format")
    _back = _c.encode(_want, saturate=False)
    _nn = ~_t.isnan(_want)
    _at(_t.equal(_back[_nn], _codes[_nn]), f"{_f.name}: encode(decode(code)) != code for codes "
        f"{[hex(v) for v in _codes[_nn][_back[_nn] != _codes[_nn]].tolist()][:8]}")
    _at(bool(_t.isnan(_c.decode(_c.encode(_t.tensor([_m.nan, -_m.nan])))).all()), f"{_f.name}: NaN must encode to a NaN code")
    # every tie and dense random values, against torch's cast after clamping
    _grid = _want[_t.isfinite(_want)].unique()
    _mid = (_grid[:-1] + _grid[1:]) / 2
    _g = _t.Generator().manual_seed(41)
    _x = _t.randn(60000, generator=_g).sign() * 10 ** _t.empty(60000).uniform_(-7, 6, generator=_g)
    _x = _t.cat([_x, _mid, _grid, _t.tensor([0.0, -0.0, 1e9, -1e9])])
    _ref = _x.clamp(-_f.max, _f.max).to(_f.torch_dtype).view(_t.uint8)
    _enc = _c.encode(_x)
    _bad = _enc != _ref
    _at(not bool(_bad.any()), f"{_f.name}: encode disagrees with torch's (clamped) cast at {_x[_bad][:5].tolist()}: "
        f"got {_enc[_bad][:5].tolist()}, torch {_ref[_bad][:5].tolist()}",
        hint="round half to even on the tick spacing of the value's binade; the subnormal spacing is 2^(1-bias-M)")
    _at(_enc.shape == _x.shape, "encode must keep the input's shape")
# bit level: encode/decode must not lean on torch's float8 casts (they are the oracle here)
for _fn in (FP8Converter.encode, FP8Converter.decode):
    _used = _code_names(_fn) & {"float8_e4m3fn", "float8_e5m2", "torch_dtype", "cast_to_fp8", "round_to_format"}
    _at(not _used, f"{_fn.__name__} must work at the bit level, without torch's float8 dtypes (it uses {sorted(_used)})")
# overflow without saturation: E5M2 -> inf, E4M3 -> NaN; with saturation -> +-max
_e5 = FP8Converter("e5m2")
_at(_e5.encode(_t.tensor([1e6, -1e6, _m.inf]), saturate=False).tolist() == [0x7C, 0xFC, 0x7C],
    "E5M2 without saturation: overflow and inf encode to +-inf (0x7c / 0xfc)")
_at(_e5.encode(_t.tensor([1e6, -_m.inf])).tolist() == [0x7B, 0xFB], "E5M2 with saturation: +-57344 (0x7b / 0xfb)")
_at(bool(_t.isnan(FP8Converter("e4m3").decode(FP8Converter("e4m3").encode(_t.tensor([500.0]), saturate=False))).all()),
    "E4M3 has no inf: an overflow without saturation is NaN")
_at(FP8Converter("e4m3").encode(_t.tensor([-_m.inf])).tolist() == [0xFE], "E4M3 saturates -inf to -448 (0xfe)")
_at(FP8Converter("e4m3").encode(_t.tensor([[1.0, 2.0], [3.0, 4.0]])).shape == (2, 2), "encode keeps shapes")
print("codec: hidden checks passed")
### END HIDDEN TESTS

# %% [test id=test_04_1_quantize points=1]
from course_lib.testing import assert_close, assert_shape, assert_true

torch.manual_seed(1)
conv = FP8Converter("e4m3")
x = torch.randn(4, 256)
x_q, s = conv.quantize(x, "tile")
assert_shape(s, (4, 2), "tile scales", hint="one scale per 1x128 tile: (M, K/128)")
assert_true(x_q.dtype == torch.float8_e4m3fn, f"x_q should be torch.float8_e4m3fn, got {x_q.dtype}")
assert_close(s, x.reshape(4, 2, 128).abs().amax(-1) / 448, rtol=1e-6, atol=0, name="tile scales",
             hint="scale = amax of the tile / 448")
assert_close(conv.dequantize(x_q, s), x, rtol=0.07, atol=1e-3, name="dequantize(quantize(x))")
w_q, w_s = conv.quantize(torch.randn(256, 384), "block")
assert_shape(w_s, (2, 3), "block scales", hint="one scale per 128x128 block: (N/128, K/128)")
print("quantize: visible checks passed")

# %% [test id=test_04_1_quantize_hidden points=3]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import math as _m
import torch as _t
from course_lib.deepseek import fp8 as _ref
from course_lib.testing import assert_close as _ac, assert_shape as _as, assert_true as _at

_g = _t.Generator().manual_seed(42)
_c = FP8Converter("e4m3")
_x = _t.randn(8, 640, generator=_g) * 10 ** _t.empty(8, 1).uniform_(-3, 3, generator=_g)
_q, _s = _c.quantize(_x, "tile")
_as(_s, (8, 5), "tile scales of an (8, 640) activation", hint="per-tensor instead of per-tile scales")
_amax = _x.reshape(8, 5, 128).abs().amax(-1)
_at(_s.unique().numel() > 1, "per-tensor instead of per-tile scales: every 1x128 tile needs its own amax")
_ratio = _s / (_amax / 448)
_at(not bool(((_ratio - 448 / 127).abs() < 1e-3).all()), "scale uses amax/127 (the int8 range): E4M3 needs amax / 448")
_at(not bool(((_s * _amax / 448 - 1).abs() < 1e-3).all()),
    "scales stored as their reciprocal (448 / amax): store the dequantisation factor amax / 448 and multiply by it")
_ac(_s, _amax / 448, rtol=1e-6, atol=0, name="tile scales = amax / 448")
_at(_t.equal(_q.float().abs().reshape(8, 5, 128).amax(-1), _t.full((8, 5), 448.0)),
    "each tile's largest magnitude must land exactly on 448", hint="quantizing with amax/127 leaves the top of the range unused")
_deq = _c.dequantize(_q, _s)
_ac(_deq, _x, rtol=2**-4 + 1e-6, atol=float(_s.max()) * 2**-10, name="dequantize(quantize(x))",
    hint="scales stored as their reciprocal by mistake, or dequantize divides instead of multiplying")
# agreement with the course reference (x / s, clamp, cast)
_rq, _rs = _ref.quantize_tiles(_x)
_same = (_q.view(_t.uint8) == _rq.view(_t.uint8)).float().mean().item()
_at(_same > 0.999, f"only {100 * _same:.2f}% of your codes match the reference quantiser (divide by the scale, clamp, cast)")
# blocks
_w = _t.randn(256, 384, generator=_g)
_wq, _ws = _c.quantize(_w, "block")
_as(_ws, (2, 3), "block scales of a (256, 384) weight")
_ac(_ws, _w.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3)) / 448, rtol=1e-6, atol=0, name="block scales")
_ac(_c.dequantize(_wq, _ws), _ref.dequantize(*_ref.quantize_blocks(_w)), rtol=1e-6, atol=1e-7, name="dequantised blocks")
# tensor-wise
_tq, _ts = _c.quantize(_x, "tensor")
_at(_ts.dim() == 0, f"a tensor-wise scale is a 0-dim tensor, got shape {tuple(_ts.shape)}")
_ac(_ts, _x.abs().amax() / 448, rtol=1e-6, atol=0, name="tensor scale")
# all-zero tiles: finite scale (amax floored at 1e-4) and zeros
_z = _t.randn(2, 256, generator=_g)
_z[1, :128] = 0
_zq, _zs = _c.quantize(_z, "tile")
_at(bool(_t.isfinite(_zs).all()), "an all-zero tile must get a finite scale: floor amax at 1e-4 before dividing")
_at(abs(_zs[1, 0].item() - 1e-4 / 448) < 1e-12, f"an all-zero tile's scale should be 1e-4 / 448, got {_zs[1, 0].item():.3g}")
_at(bool((_c.dequantize(_zq, _zs)[1, :128] == 0).all()), "an all-zero tile must dequantise to zeros")
# NaN stays inside its tile
_n = _t.randn(4, 512, generator=_g)
_cq, _ = _c.quantize(_n, "tile")
_n[2, 300] = _m.nan
_nq, _ns = _c.quantize(_n, "tile")
_nd = _c.dequantize(_nq, _ns)
_mask = _t.ones(4, 512, dtype=_t.bool)
_mask[2, 256:384] = False
_at(not bool(_t.isnan(_nd[_mask]).any()), "a NaN leaked out of its 1x128 tile into other tiles")
_at(_t.equal(_nq.view(_t.uint8)[_mask], _cq.view(_t.uint8)[_mask]), "tiles without the NaN must quantise as before")
# re-quantising a dequantised tensor is bit-identical
_q2, _ = _c.quantize(_deq, "tile")
_at(_t.equal(_q2.view(_t.uint8), _q.view(_t.uint8)), "re-quantising a dequantised tensor must give the same codes")
# no clamping: with a fixed (delayed) scale, values beyond the range must saturate, not become inf/NaN
_c5 = FP8Converter("e5m2")
_big = _t.tensor([[1.0, -2.0] * 64]) * 1e5
_bq, _ = _c5.quantize(_big, "tile", scale=_t.tensor([[1.0]]))
_bv = _bq.float()
_at(bool(_t.isfinite(_bv).all()), "no clamping: values beyond the range became inf/NaN; clamp to +-max before the cast")
_at(float(_bv.abs().max()) == 57344.0, "saturated values should be +-57344 for E5M2")
# per-tile vs per-tensor with outliers (0.1 % of values x 1e5)
_a = _t.randn(128, 1024, generator=_g)
_o = _t.rand(_a.shape, generator=_g) < 1e-3
_a = _t.where(_o, _a * 1e5, _a)
_sq_tile = _ref.sqnr_db(_a, _c.dequantize(*_c.quantize(_a, "tile")), mask=~_o)
_sq_tensor = _ref.sqnr_db(_a, _c.dequantize(*_c.quantize(_a, "tensor")), mask=~_o)
_at(_sq_tile > _sq_tensor + 12, f"per-tensor instead of per-tile scales? tile SQNR {_sq_tile:.1f} dB vs tensor {_sq_tensor:.1f} dB")
_at(_sq_tile > 22, f"per-tile SQNR with outliers should stay above 22 dB (reference ~26 dB), got {_sq_tile:.1f} dB")
print("quantize: hidden checks passed")
### END HIDDEN TESTS

# %% [markdown]
# **Checkpoint:** your E4M3 codec matches torch on all 256 codes, and a 1x128 tile's largest value lands exactly
# on 448.
#
# **Rounding error vs magnitude.** The relative error of rounding to FP8 is flat across the normal range (at
# most $2^{-(M+1)}$) and grows below the smallest normal, where the ticks no longer shrink with the value.

# %% [code]
mags = torch.logspace(-12, 17, 60000, base=2.0)  # a dense grid of magnitudes, 2^-12 .. 2^17


def rounding_error_figure():
    bins = torch.linspace(-12, 17, 30 * 8 + 1)  # 8 bins per binade
    centers = 2 ** ((bins[1:] + bins[:-1]) / 2)
    rels = {}
    for f in (E4M3, E5M2):
        conv = FP8Converter(f)
        rels[f] = (conv.decode(conv.encode(mags)) - mags).abs() / mags  # your codec's round trip
    fig, ax = plt.subplots(figsize=(8, 4))
    for f, rel in rels.items():
        which = torch.bucketize(torch.log2(mags), bins).clamp(1, len(bins) - 1) - 1
        worst = torch.zeros(len(bins) - 1).scatter_reduce(0, which, rel, reduce="amax")  # worst error per bin
        line, = ax.step(centers.numpy(), 100 * worst.numpy(), where="mid", label=f"{f.name}: worst case per bin")
        for edge in (f.min_subnormal, f.min_normal, f.max):
            ax.axvline(edge, color=line.get_color(), ls="--", lw=0.7)
    ax.axhline(100 * 2**-4, color="k", lw=0.7, ls=":", label="$2^{-4}$ = 6.25% (E4M3 normal range)")
    ax.axhline(100 * 2**-3, color="gray", lw=0.7, ls=":", label="$2^{-3}$ = 12.5% (E5M2 normal range)")
    ax.set(xscale="log", yscale="log", ylim=(1, 150), xlabel="|x|  (dashed: min subnormal, min normal, max)",
           ylabel="relative rounding error (%)", title="FP8 rounding error vs magnitude (saturating)")
    ax.legend(fontsize=8, loc="upper center")
    plt.show()


yours_or_placeholder(rounding_error_figure, "exercise 4.1 (FP8Converter.encode / decode)")

# %% [markdown]
# **Granularity and outliers.** The signal-to-quantisation-noise ratio
# $\mathrm{SQNR} = 10\log_{10}\bigl(\sum x^2 / \sum (x-\hat x)^2\bigr)$ (dB) of E4M3 on Gaussian data is about
# 31 dB, whatever the granularity. Activations are not Gaussian: a few channels carry huge values. Below,
# 0.1 % of the entries are multiplied by $10^5$ and we measure the SQNR *of the ordinary values*. One
# outlier sets the scale of every value that shares it: a per-tensor scale pushes the bulk into the
# subnormals, a 128x128 block holds ~16 outliers, a full row ~1, a 1x128 tile only 0.13 on average.

# %% [code]
g = torch.Generator().manual_seed(0)
act = torch.randn(256, 1024, generator=g)
outlier = torch.rand(act.shape, generator=g) < 1e-3
act_out = torch.where(outlier, act * 1e5, act)


def round_trip_q(x: torch.Tensor, gran: str) -> torch.Tensor:
    """Your quantise-then-dequantise; a row is one 1xK tile (a converter whose tile is the whole row)."""
    conv = FP8Converter("e4m3", tile=x.shape[1]) if gran == "row" else FP8Converter("e4m3")
    return conv.dequantize(*conv.quantize(x, "tile" if gran == "row" else gran))


def granularity_figure():
    rows = []
    for gran in ("tensor", "row", "block", "tile"):
        clean = sqnr_db(act, round_trip_q(act, gran))
        bulk = sqnr_db(act_out, round_trip_q(act_out, gran), mask=~outlier)
        rows.append((gran, clean, bulk))
    print(f"{'granularity':<12}{'no outliers':>14}{'0.1% x 1e5 (bulk)':>20}")
    for gran, clean, bulk in rows:
        print(f"{gran:<12}{clean:>11.1f} dB{bulk:>17.1f} dB")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xpos = np.arange(len(rows))
    ax.bar(xpos - 0.2, [r[1] for r in rows], 0.4, label="Gaussian activations")
    ax.bar(xpos + 0.2, [r[2] for r in rows], 0.4, label="with 0.1% outliers x 1e5")
    ax.set_xticks(xpos, ["per tensor", "per row (1xK)", "128x128 block", "1x128 tile"])
    ax.set(ylabel="SQNR of ordinary values (dB)", title="E4M3 quantisation error by scaling granularity")
    ax.legend(fontsize=8)
    plt.show()


yours_or_placeholder(granularity_figure, "exercise 4.1 (FP8Converter.quantize / dequantize)")

# %% [markdown]
# ### 4.1.2 Fine-grained FP8 GEMM and accumulation precision
#
# With per-tile scales a GEMM can no longer scale its result once at the end: the scales change along the
# contraction dimension $K$. DeepSeek's kernel multiplies one 128-wide slice of $K$ at a time on the tensor
# cores, then — on the CUDA cores — multiplies the partial result by the two scales and adds it to an FP32
# accumulator (DeepSeek-V3 figure 7):
#
# $$ y_{mn} = \sum_{k=0}^{K/128-1} s^{A}_{m,k}\, s^{B}_{\lfloor n/128 \rfloor,k} \sum_{j \in \text{slice } k} a^{q}_{mj}\, b^{q}_{nj}. $$
#
# ```
#  for each K-slice k (128 wide):    tensor cores: P = A_q[:, k] @ B_q[:, k]^T       (FP8 x FP8, ~14-bit accumulator)
#                                    CUDA cores:   Y += P * s_A[:, k] * s_B[:, k]     (FP32: "promotion")
# ```
#
# **Why promote?** Hopper's FP8 tensor cores keep only about 14 bits of the running sum; every addition drops
# the bits shifted out while aligning, so the error grows with $K$ (DeepSeek measured up to ~2 % relative
# error at $K = 4096$). Restarting the limited accumulator every $N_C = 128$ products and adding its partial
# sum in FP32 keeps the error independent of $K$. You simulate the accumulator with the given
# `round_to_bits(x, bits, "truncate")`, which keeps `bits` mantissa bits.

# %% [solution id=ex_04_1_gemm]
def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``a @ b^T`` from FP8 operands with fine-grained scales, as DeepSeek-V3's kernel computes it.

    a_q: (M, K) FP8, a_s: (M, K/block) — one scale per 1 x block tile.
    b_q: (N, K) FP8, b_s: (N/block, K/block) per block x block block, or (N, K/block) per 1 x block tile.
    Returns (M, N) float32: for each K-slice k, y += (a_q[:, k] @ b_q[:, k]^T) * a_s[:, k, None] * b_s[None, :, k].
    """
    ### BEGIN SOLUTION
    M, K = a_q.shape
    N = b_q.shape[0]
    if b_s.shape[0] != N:  # one scale row per block of rows: expand to one per row
        b_s = b_s.repeat_interleave(block, dim=0)  # (N, K/block)
    a, b = a_q.to(torch.float32), b_q.to(torch.float32)
    y = torch.zeros(M, N)
    for k in range(K // block):
        sl = slice(k * block, (k + 1) * block)
        y += (a[:, sl] @ b[:, sl].T) * a_s[:, k, None] * b_s[None, :, k]
    return y
    ### END SOLUTION


def accumulate(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 14, promote_every: int | None = None) -> torch.Tensor:
    """``a @ b^T`` with a limited-precision accumulator, optionally promoted to FP32.

    a: (M, K), b: (N, K) float32 holding FP8 values (their products are exact in float32).
    Add the products in order k = 0, 1, ..., K-1 to a running sum kept at ``mantissa_bits`` bits:
        acc = round_to_bits(acc + a[:, k, None] * b[None, :, k], mantissa_bits, "truncate")
    promote_every=None: one accumulator for all of K. promote_every=N_C: after every N_C products (and at
    the end) add acc to an FP32 total and restart acc from 0. Returns (M, N) float32.
    """
    ### BEGIN SOLUTION
    M, K = a.shape
    N = b.shape[0]
    chunk = promote_every or K
    total = torch.zeros(M, N)
    acc = torch.zeros(M, N)
    for k in range(K):
        acc = round_to_bits(acc + a[:, k, None] * b[None, :, k], mantissa_bits, "truncate")
        if (k + 1) % chunk == 0 or k == K - 1:
            total = total + acc  # promotion: an FP32 addition
            acc = torch.zeros(M, N)
    return total
    ### END SOLUTION


# %% [test id=test_04_1_gemm points=1]
from course_lib.testing import assert_close, assert_shape

torch.manual_seed(2)
conv = FP8Converter("e4m3")
a_q, a_s = conv.quantize(torch.randn(16, 256), "tile")
b_q, b_s = conv.quantize(torch.randn(128, 256), "block")
y = fp8_gemm(a_q, a_s, b_q, b_s)
assert_shape(y, (16, 128), "fp8_gemm output")
ref_y = conv.dequantize(a_q, a_s).double() @ conv.dequantize(b_q, b_s).double().T
assert_close(y, ref_y.float(), atol=1e-4, rtol=1e-5, name="fp8_gemm vs dequantise-then-matmul",
             hint="multiply each K-slice's partial product by a_s[:, k] and b_s[:, k] before adding it up")
a8, b8 = a_q[:4].float(), b_q[:3].float()
acc = accumulate(a8, b8, mantissa_bits=23, promote_every=None)
assert_close(acc, (a8.double() @ b8.double().T).float(), atol=1e-3, rtol=1e-5, name="accumulate with 23 bits")
print("gemm: visible checks passed")

# %% [test id=test_04_1_gemm_hidden points=2]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import torch as _t
from course_lib.deepseek import fp8 as _ref
from course_lib.testing import assert_close as _ac, assert_true as _at

_g = _t.Generator().manual_seed(43)
_a = _t.randn(200 // 8 * 8, 640, generator=_g)
_b = _t.randn(384, 640, generator=_g)
_aq, _as = _ref.quantize_tiles(_a)
_bq, _bs = _ref.quantize_blocks(_b)
_y = fp8_gemm(_aq, _as, _bq, _bs)
_oracle = (_ref.dequantize(_aq, _as).double() @ _ref.dequantize(_bq, _bs).double().T).float()
_ac(_y, _oracle, atol=1e-5 * float(_oracle.abs().max()), rtol=0, name="blockwise GEMM vs dequantise-then-matmul (float64)")
_ac(_y, _ref.scaled_matmul_emulated(_aq, _as, _bq, _bs), atol=1e-5 * float(_oracle.abs().max()), rtol=0,
    name="blockwise GEMM vs the course reference")
# both operands in 1x128 tiles (the Wgrad GEMM)
_btq, _bts = _ref.quantize_tiles(_b)
_ac(fp8_gemm(_aq, _as, _btq, _bts), _ref.scaled_matmul_emulated(_aq, _as, _btq, _bts), atol=1e-5 * float(_oracle.abs().max()),
    rtol=0, name="tile x tile GEMM", hint="b_s may be (N, K/128): one scale per row and K-slice")
# limited accumulation: same order and rounding as the reference, with and without promotion
_x8 = _ref.round_to_format(_t.randn(6, 1024, generator=_g) * 4)
_w8 = _ref.round_to_format(_t.randn(5, 1024, generator=_g) * 4)
for _pe in (None, 128):
    _ac(accumulate(_x8, _w8, 14, _pe), _ref.accumulate_limited(_x8, _w8, 14, _pe), atol=0, rtol=1e-6,
        name=f"accumulate(promote_every={_pe}) vs the reference simulation")
_x8 = _ref.round_to_format(_t.randn(4, 2048, generator=_g) * 4)
_w8 = _ref.round_to_format(_t.randn(4, 2048, generator=_g) * 4)
_exact = _x8.double() @ _w8.double().T
_den = _x8.abs().double() @ _w8.abs().double().T
_e_none = float(((accumulate(_x8, _w8, 14) - _exact).abs() / _den).max())
_e_prom = float(((accumulate(_x8, _w8, 14, 128) - _exact).abs() / _den).max())
_at(_e_none > 10 * _e_prom, f"promotion every 128 should cut the accumulation error by >10x at K=2048: {_e_none:.2e} vs {_e_prom:.2e}")
print("gemm: hidden checks passed")
### END HIDDEN TESTS

# %% [markdown]
# **Checkpoint:** your fine-grained GEMM equals dequantise-then-matmul to float32 rounding.
#
# **Error vs K.** Products of FP8 values are exact; only the accumulator loses bits. Without promotion the
# truncation error piles up with every addition; with promotion every 128 products it stays flat.

# %% [code]
def to_e4m3_values(x: torch.Tensor) -> torch.Tensor:
    """float32 tensor holding E4M3 values (clamp, then torch's cast): their products are exact in float32."""
    return x.clamp(-E4M3.max, E4M3.max).to(E4M3.torch_dtype).to(torch.float32)


def accumulation_figure():
    g = torch.Generator().manual_seed(0)
    Ks = sizes([128, 256, 512, 1024, 2048], [128, 256, 512, 1024, 2048, 4096])
    settings = {"14-bit accumulator": (14, None), "14-bit + FP32 promotion every 128": (14, 128)}
    curves = {name: [] for name in settings}
    fp32_max = []
    print(f"{'K':>6}{'14-bit':>12}{'promoted':>12}{'FP32 (max)':>12}   median relative error of the 8x8 outputs")
    for K in Ks:
        a8 = to_e4m3_values(torch.randn(8, K, generator=g) * 4)
        b8 = to_e4m3_values(torch.randn(8, K, generator=g) * 4)
        exact = a8.double() @ b8.double().T
        for name, (bits, promote) in settings.items():
            out = accumulate(a8, b8, bits, promote)  # your simulation
            curves[name].append(float(((out - exact).abs() / exact.abs()).median()))
        fp32_max.append(float(((accumulate(a8, b8, 23, None) - exact).abs() / exact.abs()).max()))
        print(f"{K:>6}{curves['14-bit accumulator'][-1]:>12.2e}{curves['14-bit + FP32 promotion every 128'][-1]:>12.2e}"
              f"{fp32_max[-1]:>12.1e}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, errs in curves.items():
        ax.plot(Ks, [100 * e for e in errs], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="contraction length K", ylabel="median relative error (%)",
           title="Accumulation error of an FP8 GEMM vs K")
    ax.minorticks_off()
    ax.set_xticks(Ks, [str(k) for k in Ks])
    ax.legend(fontsize=8)
    plt.show()


yours_or_placeholder(accumulation_figure, "exercise 4.1 (accumulate)")

# %% [markdown]
# ### 4.1.3 An FP8 linear layer
#
# A linear layer $y = xW^\top$ ($x$: $M \times K$ tokens, $W$: $N \times K$) runs three GEMMs per step. DeepSeek
# feeds all three with E4M3 (DeepSeek-V3 figure 6):
#
# | GEMM | computes | contraction over | FP8 operands |
# |---|---|---|---|
# | Fprop | $y = x W^\top$ | $K$ | $x$ in 1x128 tiles along $K$; $W$ in 128x128 blocks |
# | Dgrad | $\partial x = \partial y\, W$ | $N$ | $\partial y$ in 1x128 tiles along $N$; $W^\top$: the **same** blocks, transposed |
# | Wgrad | $\partial W = \partial y^\top x$ | $M$ (tokens) | $\partial y^\top$ and $x^\top$, both re-tiled 1x128 along $M$ |
#
# A 128x128 block's scale does not care about direction, so Dgrad reuses the quantised weight; the cached
# FP8 activation is dequantised and re-tiled along the tokens for Wgrad. The master weight $W$ and its
# gradient stay FP32; embedding, output head, norms, attention and the MoE gate are not FP8 at all.
# Implement `forward` and `backward` with your `FP8Converter` and `fp8_gemm` (M, K, N multiples of 128).

# %% [solution id=ex_04_1_linear]
class FP8LinearFunction(torch.autograd.Function):
    """``y = x W^T`` whose Fprop, Dgrad and Wgrad GEMMs all take E4M3 inputs (DeepSeek-V3 figure 6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x: (..., K) float32 or bfloat16; weight: (N, K) FP32 master weight. Returns (..., N) in x.dtype.

        Fprop: x in 1x128 tiles, weight in 128x128 blocks, y = fp8_gemm(...). Save the FP8 operands for backward.
        """
        conv = FP8Converter("e4m3")
        ### BEGIN SOLUTION
        K = x.shape[-1]
        x2d = x.reshape(-1, K).to(torch.float32)  # (M, K)
        x_q, x_s = conv.quantize(x2d, "tile")  # (M, K), (M, K/128)
        w_q, w_s = conv.quantize(weight, "block")  # (N, K), (N/128, K/128)
        y = fp8_gemm(x_q, x_s, w_q, w_s)  # (M, N)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)  # (..., N)
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """grad_y: (..., N). Returns (grad_x (..., K) in x.dtype, grad_weight (N, K) float32).

        Dgrad: dx = dy W — dy in 1x128 tiles along N, W's blocks transposed.
        Wgrad: dW = dy^T x — dy^T and the cached activation's x^T, both in 1x128 tiles along the tokens M.
        """
        conv = FP8Converter("e4m3")
        ### BEGIN SOLUTION
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        N = w_q.shape[0]
        g = grad_y.reshape(-1, N).to(torch.float32)  # (M, N)
        g_q, g_s = conv.quantize(g, "tile")  # (M, N), (M, N/128)
        grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s.T)  # (M, K): W^T is (K, N), its blocks are W's transposed
        x = conv.dequantize(x_q, x_s)  # (M, K): the cached FP8 activation
        gt_q, gt_s = conv.quantize(g.T.contiguous(), "tile")  # (N, M), (N, M/128)
        xt_q, xt_s = conv.quantize(x.T.contiguous(), "tile")  # (K, M), (K, M/128)
        grad_w = fp8_gemm(gt_q, gt_s, xt_q, xt_s)  # (N, K)
        return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), grad_w
        ### END SOLUTION


# %% [given]
class FP8Linear(nn.Module):
    """A bias-free linear layer (as all of DeepSeek's) with an FP32 master weight and FP8 GEMMs."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        return FP8LinearFunction.apply(x, self.weight)


def convert_to_fp8(model: nn.Module, skip: tuple[str, ...] = ("head",)) -> nn.Module:
    """Replace every bias-free nn.Linear except those named in ``skip`` by an FP8Linear sharing its weight Parameter."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None and name not in skip:
            layer = FP8Linear(child.in_features, child.out_features)
            layer.weight = child.weight  # the same FP32 master weight (an optimizer built before still updates it)
            setattr(model, name, layer)
        else:
            convert_to_fp8(child, skip)
    return model


# %% [test id=test_04_1_linear points=1]
from course_lib.testing import assert_close, assert_shape, assert_true

torch.manual_seed(3)
x = torch.randn(128, 256, requires_grad=True)
w = torch.nn.Parameter(torch.randn(128, 256) / 16)
y = FP8LinearFunction.apply(x, w)
assert_shape(y, (128, 128), "FP8 linear output")
rel = ((y - x @ w.T).norm() / (x @ w.T).norm()).detach().item()
assert_true(rel < 0.05, f"FP8 linear output is {100 * rel:.1f}% away from FP32 (expected ~3.7%)")
y.sum().backward()
assert_shape(x.grad, (128, 256), "grad_x")
assert_shape(w.grad, (128, 256), "grad_weight")
assert_true(w.grad.dtype == torch.float32, "the weight gradient must stay FP32 (master weights)")
print("FP8 linear: visible checks passed")

# %% [test id=test_04_1_linear_hidden points=3]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import math as _m
import torch as _t
from course_lib.deepseek import fp8 as _ref
from course_lib.testing import assert_close as _ac, assert_true as _at

_g = _t.Generator().manual_seed(44)


def _rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


for _shape in ((256, 256, 384), (2, 64, 384, 128)):
    *_lead, _K, _N = _shape
    _x = _t.randn(*_lead, _K, generator=_g)
    _w = _t.randn(_N, _K, generator=_g) / _m.sqrt(_K)
    _gy = _t.randn(*_lead, _N, generator=_g)
    _xa, _wa = _x.clone().requires_grad_(), _w.clone().requires_grad_()
    _y = FP8LinearFunction.apply(_xa, _wa)
    _y.backward(_gy)
    _xr, _wr = _x.clone().requires_grad_(), _w.clone().requires_grad_()
    _yr = _ref.fp8_linear(_xr, _wr, recipe="blockwise", backend="emulated")
    _yr.backward(_gy)
    _ac(_y, _yr, atol=1e-4 * float(_yr.detach().abs().max()), rtol=0, name=f"Fprop {tuple(_shape)} vs reference",
        hint="x in 1x128 tiles, W in 128x128 blocks")
    _ac(_xa.grad, _xr.grad, atol=1e-4 * float(_xr.grad.abs().max()), rtol=0, name="Dgrad vs reference",
        hint="Dgrad must quantise dy in 1x128 tiles along N and use W's FP8 blocks (transposed), not FP32 weights")
    _ac(_wa.grad, _wr.grad, atol=1e-4 * float(_wr.grad.abs().max()), rtol=0, name="Wgrad vs reference",
        hint="Wgrad re-quantises dy^T and x^T in 1x128 tiles along the token dimension M")
    # against FP32, within the calibrated bound (measured: y 3.7 %, dx 3.7 %, dW 4.4 %)
    _x32, _w32 = _x.clone().requires_grad_(), _w.clone().requires_grad_()
    (_x32 @ _w32.T).backward(_gy)
    _at(_rel(_y, _x32 @ _w32.T) < 0.05, "FP8 Fprop is more than 5% away from FP32")
    _at(_rel(_xa.grad, _x32.grad) < 0.05, "FP8 Dgrad is more than 5% away from FP32")
    _at(_rel(_wa.grad, _w32.grad) < 0.06, "FP8 Wgrad is more than 6% away from FP32")
    _at(_rel(_xa.grad, _x32.grad) > 0.01, "Dgrad matches FP32 too well: its inputs must be FP8 too")
    _at(_rel(_wa.grad, _w32.grad) > 0.01, "Wgrad matches FP32 too well: its inputs must be FP8 too")
    _at(_y.shape == (*_lead, _N) and _xa.grad.shape == _x.shape, "shapes of y and grad_x must follow x")
    _at(_wa.grad.dtype == _t.float32, "weight gradient must be FP32")
# bf16 activations keep their dtype; the FP32 master weight is untouched by forward
_xb = _t.randn(128, 256, generator=_g).to(_t.bfloat16).requires_grad_()
_wb = _t.randn(128, 256, generator=_g).requires_grad_()
_w0 = _wb.detach().clone()
_yb = FP8LinearFunction.apply(_xb, _wb)
_at(_yb.dtype == _t.bfloat16, f"bf16 input should give a bf16 output, got {_yb.dtype}")
_yb.float().sum().backward()
_at(_xb.grad.dtype == _t.bfloat16 and _wb.grad.dtype == _t.float32, "grad dtypes: x's dtype for dx, FP32 for dW")
_at(_t.equal(_wb.detach(), _w0), "forward must not modify the master weight")
print("FP8 linear: hidden checks passed")
### END HIDDEN TESTS

# %% [markdown]
# **Checkpoint:** all three GEMMs of your layer read E4M3, and its gradients sit ~4 % (relative Frobenius
# norm) from FP32 — the quantisation noise of two 3-bit-mantissa operands, which averages out over training.
#
# ## 4.2 Mixed-precision training framework
#
# Mixed precision keeps **FP32 master weights** (the optimizer updates them; updates far smaller than a
# BF16 ulp would vanish otherwise) and runs the matrix products in a narrow format:
#
# - **BF16** (8 exponent bits, like FP32): `torch.autocast(device, dtype=torch.bfloat16)`; no scaling needed.
# - **FP16** (5 exponent bits): small gradients underflow. **Dynamic loss scaling** multiplies the loss by
#   $S$ before backward and divides the gradients by $S$ after; if any gradient is inf/NaN the step is
#   **skipped** and $S \leftarrow S/2$; after 2000 clean steps in a row $S \leftarrow 2S$ (so the scale finds
#   its way back up). $S_0 = 2^{16}$ — exactly `torch.amp.GradScaler`'s defaults.
# - **FP8** (this section): FP8 GEMMs in the linear layers, everything else FP32.
#
# ```
#  train_step:  zero grads -> [autocast] loss = loss_fn(model, batch) -> backward(loss x S)
#               -> grads /= S -> any inf/NaN?  yes: skip step, S /= 2
#                                              no:  clip (on unscaled grads!) -> optimizer.step() -> maybe S *= 2
# ```
#
# Clip **after** unscaling: a threshold of 1.0 means nothing for gradients that are $2^{16}$ times too large.

# %% [given]
class TinyLM(nn.Module):
    """A token-wise language model: embedding -> n x [RMSNorm -> SwiGLU] residual blocks -> RMSNorm -> head.

    The FP8 recipe converts the SwiGLU projections (w1, w2, w3); embedding, norms and head stay FP32.
    """

    def __init__(self, vocab: int = 128, dim: int = 128, hidden: int = 256, n_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(n_layers))
        self.mlps = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # (T, dim)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(self.norm(h))  # (T, vocab)


def bigram_task(vocab: int = 128, seed: int = 0):
    """A synthetic language: next token ~ P[current token]. Returns (P, entropy in nats, batch sampler)."""
    gen = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 2.5, dim=-1)  # (vocab, vocab)
    entropy = float(-(P * P.log()).sum(-1).mean())

    def sample(n: int, g: torch.Generator) -> dict:
        x = torch.randint(0, vocab, (n,), generator=g)
        y = torch.multinomial(P[x], 1, generator=g).squeeze(1)
        return {"x": x, "y": y}

    return P, entropy, sample


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]).float(), batch["y"])


# %% [solution id=ex_04_2_trainer]
class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's rules (init 2^16, x2 after 2000 clean steps, x0.5 on inf/NaN)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale_value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0  # clean steps since the last change of scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the current scale."""
        ### BEGIN SOLUTION
        return loss * self.scale_value
        ### END SOLUTION

    def unscale_(self, params) -> bool:
        """Divide every existing ``p.grad`` by the scale, in place. Returns True if any gradient holds inf or NaN."""
        ### BEGIN SOLUTION
        found_inf = False
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.scale_value)
                found_inf = found_inf or not bool(torch.isfinite(p.grad).all())
        return found_inf
        ### END SOLUTION

    def update(self, found_inf: bool) -> None:
        """Back off (x backoff_factor, reset the tracker) on overflow; grow (x growth_factor) after growth_interval clean steps."""
        ### BEGIN SOLUTION
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.growth_tracker = 0
        ### END SOLUTION


class MixedPrecisionTrainer:
    """Training loop with FP32 master weights, autocast (bf16/fp16), dynamic loss scaling (fp16) and FP8 linears (fp8)."""

    PRECISIONS = ("fp32", "bf16", "fp16", "fp8")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, precision: str = "fp32",
                 max_grad_norm: float = 1.0, scaler: LossScaler | None = None) -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {precision!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.precision, self.max_grad_norm = precision, max_grad_norm
        self.scaler = scaler if scaler is not None else (LossScaler() if precision == "fp16" else None)
        if precision == "fp8":
            convert_to_fp8(model)  # the FP8 layers take over the same weight Parameters: the optimizer keeps tracking them

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32 and fp8)."""
        device = next(self.model.parameters()).device.type
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(device, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()

    def train_step(self, batch) -> dict:
        """One optimisation step on ``batch``.

        zero grads; loss = loss_fn(model, batch) under self.autocast(); backward (scaled by self.scaler if any);
        unscale; if any gradient is inf/NaN: skip the step; else clip the total gradient norm to max_grad_norm
        and step; finally update the scaler. Returns {"loss": float (unscaled), "grad_norm": float (of the
        unscaled gradients before clipping; inf on a skipped step), "skipped": bool, "scale": float (the loss
        scale after the update; 1.0 without scaler)}.
        """
        ### BEGIN SOLUTION
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        loss = loss.float()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            found_inf = self.scaler.unscale_(params)
        else:
            loss.backward()
            found_inf = any(not bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        if found_inf:
            grad_norm = math.inf
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        scale = self.scaler.scale_value if self.scaler is not None else 1.0
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "skipped": found_inf, "scale": scale}
        ### END SOLUTION


# %% [test id=test_04_2_trainer points=1]
from course_lib.testing import assert_true

s = LossScaler()
assert_true(float(s.scale(torch.tensor(2.0))) == 2.0**17, "scale(loss) should multiply by the initial 2^16")
s.update(True)
assert_true(s.scale_value == 2.0**15, f"an overflow halves the scale: expected 2^15, got {s.scale_value}")
torch.manual_seed(4)
P, H, sample = bigram_task()
model = TinyLM()
trainer = MixedPrecisionTrainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), lm_loss, "fp32")
g = torch.Generator().manual_seed(0)
logs = [trainer.train_step(sample(128, g)) for _ in range(10)]
assert_true(set(logs[0]) >= {"loss", "grad_norm", "skipped", "scale"}, f"train_step should return loss, grad_norm, skipped, scale; got {set(logs[0])}")
assert_true(logs[-1]["loss"] < logs[0]["loss"], f"10 fp32 steps should lower the loss: {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f}")
print("trainer: visible checks passed")

# %% [test id=test_04_2_trainer_hidden points=3]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import math as _m
import torch as _t
from course_lib.testing import assert_close as _ac, assert_true as _at

# loss scale never growing back (pitfall)
_s = LossScaler(growth_interval=5)
_s.update(True)
for _ in range(5):
    _s.update(False)
_at(_s.scale_value == 2.0**16, "loss scale never grows back: after growth_interval clean steps it must double")
_s2 = LossScaler()
for _ in range(1999):
    _s2.update(False)
_at(_s2.scale_value == 2.0**16, "the scale must not grow before 2000 clean steps")
_s2.update(False)
_at(_s2.scale_value == 2.0**17, "after 2000 clean steps the scale doubles")
# the loss-scale trajectory of the trainer in fp16, against torch.amp.GradScaler on the same overflow pattern
_pattern = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]


def _toy(seed):
    _t.manual_seed(seed)
    return _t.nn.Sequential(_t.nn.Linear(16, 32), _t.nn.Tanh(), _t.nn.Linear(32, 4))


def _toy_loss(model, batch):
    return (model(batch["x"]).float() - batch["y"]).pow(2).mean() * batch["factor"]


_g = _t.Generator().manual_seed(45)
_batches = [{"x": _t.randn(8, 16, generator=_g), "y": _t.randn(8, 4, generator=_g), "factor": _m.inf if b else 1.0}
            for b in _pattern]
_ma, _mb = _toy(0), _toy(0)
_tr = MixedPrecisionTrainer(_ma, _t.optim.SGD(_ma.parameters(), lr=0.1), _toy_loss, "fp16", max_grad_norm=0.5,
                            scaler=LossScaler(growth_interval=3))
_opt = _t.optim.SGD(_mb.parameters(), lr=0.1)
_gs = _t.amp.GradScaler("cpu", growth_interval=3)
for _i, _b in enumerate(_batches):
    _before = [p.detach().clone() for p in _ma.parameters()]
    _log = _tr.train_step(_b)
    _opt.zero_grad()
    with _t.autocast("cpu", dtype=_t.float16):
        _l = _toy_loss(_mb, _b)
    _gs.scale(_l.float()).backward()
    _gs.unscale_(_opt)
    _t.nn.utils.clip_grad_norm_(_mb.parameters(), 0.5)
    _gs.step(_opt)
    _gs.update()
    _at(_log["scale"] == _gs.get_scale(), f"step {_i}: loss scale {_log['scale']} but torch.amp.GradScaler has {_gs.get_scale()}",
        hint="halve on inf/NaN and reset the counter; double after growth_interval clean steps in a row")
    _at(_log["skipped"] == bool(_pattern[_i]), f"step {_i}: skipped={_log['skipped']}, expected {bool(_pattern[_i])}")
    if _pattern[_i]:
        _at(all(_t.equal(a, b) for a, b in zip(_before, _ma.parameters())), "a skipped step must leave the parameters unchanged")
for _pa, _pb in zip(_ma.parameters(), _mb.parameters()):
    _ac(_pa, _pb, atol=1e-6, rtol=1e-5, name="parameters after 20 fp16 steps vs a GradScaler loop",
        hint="clip the gradient norm after unscaling, never on the scaled gradients")
# clipping on the unscaled gradients: the reported grad norm is the unscaled one
_mc = _toy(1)
_trc = MixedPrecisionTrainer(_mc, _t.optim.SGD(_mc.parameters(), lr=0.0), _toy_loss, "fp16", max_grad_norm=1e9)
_bc = {"x": _t.randn(8, 16, generator=_g), "y": _t.randn(8, 4, generator=_g), "factor": 1.0}
_logc = _trc.train_step(_bc)
_md = _toy(1)
_toy_loss(_md, _bc).backward()
_gn = float(_t.nn.utils.clip_grad_norm_(_md.parameters(), 1e9))
_at(abs(_logc["grad_norm"] - _gn) < 2e-2 * _gn, f"grad_norm {_logc['grad_norm']:.4g} should be the unscaled norm {_gn:.4g}")
# bf16 keeps FP32 master weights; fp8 converts the SwiGLU projections and trains
_P, _H, _sample = bigram_task(seed=1)
for _prec in ("bf16", "fp8"):
    _t.manual_seed(5)
    _model = TinyLM()
    _trp = MixedPrecisionTrainer(_model, _t.optim.AdamW(_model.parameters(), lr=3e-3), lm_loss, _prec)
    _gb = _t.Generator().manual_seed(1)
    _logs = [_trp.train_step(_sample(128, _gb)) for _ in range(6)]
    _at(all(p.dtype == _t.float32 for p in _model.parameters()), f"{_prec}: master weights must stay FP32")
    _at(_logs[-1]["loss"] < _logs[0]["loss"], f"{_prec}: 6 steps should lower the loss")
    _at(not any(_l["skipped"] for _l in _logs), f"{_prec}: no step should be skipped on a healthy model")
_at(isinstance(_model.mlps[0].w1, FP8Linear), "fp8 precision should run the SwiGLU projections as FP8Linear")
print("trainer: hidden checks passed")
### END HIDDEN TESTS

# %% [markdown]
# **Checkpoint:** in fp16 your loss scale follows `torch.amp.GradScaler` step for step.
#
# **Precision impact study.** The same model, data and initialisation, trained in FP32, BF16 (autocast) and
# FP8 (your emulated FP8 linears) for the same number of steps. DeepSeek reports FP8 within 0.25 % (relative)
# of BF16 at scale; here, on a tiny model, we compare the mean loss of the last steps.

# %% [code]
P, entropy, sample = bigram_task(seed=0)
steps = sizes(40, 150)
curves, seconds = {}, {}
for prec in ("fp32", "bf16", "fp8"):
    torch.manual_seed(0)
    model = TinyLM()
    trainer = MixedPrecisionTrainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), lm_loss, prec)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    try:
        logs = [trainer.train_step(sample(128, gen)) for _ in range(steps)]
    except NotImplementedError:
        print(f"(finish exercise 4.2 (train_step){' and 4.1 (FP8LinearFunction)' if prec == 'fp8' else ''} to see {prec} in this figure)")
        continue
    seconds[prec] = time.perf_counter() - t0
    curves[prec] = [lg["loss"] for lg in logs]
if curves:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = dict(zip(("fp32", "bf16", "fp8"), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for prec, ls in curves.items():
        axes[0].plot(ls, label=prec, lw=1, color=colors[prec])
        if prec != "fp32" and "fp32" in curves:
            gap = 100 * (np.array(ls) - np.array(curves["fp32"])) / np.array(curves["fp32"])
            axes[1].plot(gap, label=prec, lw=1, color=colors[prec])
    axes[0].axhline(entropy, color="k", ls=":", lw=0.8, label="entropy of the data (best possible)")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss: FP32 vs BF16 vs FP8 (emulated)")
    axes[1].axhspan(-0.25, 0.25, color="gray", alpha=0.15, label="+-0.25% (DeepSeek-V3's FP8 vs BF16)")
    axes[1].set(xlabel="step", ylabel="loss relative to FP32 (%)", title="Same batches: the gap is the precision")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    plt.show()
    tail = max(5, steps // 10)
    base = sum(curves["fp32"][-tail:]) / tail if "fp32" in curves else None
    for prec, ls in curves.items():
        final = sum(ls[-tail:]) / tail
        note = f"{100 * (final - base) / base:+.3f}% vs FP32" if base else ""
        print(f"{prec}: final loss (mean of last {tail} steps) {final:.4f}  {note}  ({seconds[prec]:.1f} s for {steps} steps)")

# %% [markdown]
# **Memory.** Bytes per element, scales included. An FP8 weight stores one FP32 scale per 128x128 block
# (+0.0002 B per parameter), an FP8 activation one per 1x128 tile (+0.031 B per element). Measured below on
# real tensors: one DeepSeek-V3 expert projection (2048 x 7168) and a batch of tokens entering it.

# %% [code]
from course_lib.bench import tensor_bytes

torch.manual_seed(0)
W = torch.randn(2048, 7168)  # one expert's w1 (moe_inter_dim x dim)
X = torch.randn(sizes(256, 1024), 7168)  # tokens entering it


def memory_figure():
    conv = FP8Converter("e4m3")
    measured = {
        "FP32": (tensor_bytes(W) / W.numel(), tensor_bytes(X) / X.numel()),
        "BF16": (tensor_bytes(W.bfloat16()) / W.numel(), tensor_bytes(X.bfloat16()) / X.numel()),
        "FP8 + scales": (tensor_bytes(conv.quantize(W, "block")) / W.numel(), tensor_bytes(conv.quantize(X, "tile")) / X.numel()),
    }
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xpos = np.arange(len(measured))
    ax.bar(xpos - 0.2, [v[0] for v in measured.values()], 0.4, label="weight (128x128 block scales)")
    ax.bar(xpos + 0.2, [v[1] for v in measured.values()], 0.4, label="activation (1x128 tile scales)")
    ax.set_xticks(xpos, list(measured))
    ax.set(ylabel="bytes per element", title="Storage per parameter / activation by format")
    ax.legend(fontsize=8)
    plt.show()
    for k, (wb, xb) in measured.items():
        print(f"{k:<13} weight {wb:.4f} B/param   activation {xb:.4f} B/element")


yours_or_placeholder(memory_figure, "exercise 4.1 (FP8Converter.quantize)")
print("DeepSeek-V3 training also keeps per parameter: FP32 master weight (4 B), FP32 gradient, BF16 AdamW moments (2 x 2 B)")

# %% [markdown]
# ## 4.3 Stability monitoring
#
# FP8 training fails quietly: a value above the range saturates, one below half the smallest subnormal
# becomes 0, and a NaN spreads through every GEMM it touches. A monitor watches, per tensor:
#
# - **overflow**: finite values with $|x/s|$ beyond max by more than rounding (above 464 for E4M3: they
#   saturate); **underflow**: nonzero values with $|x/s| \le$ min subnormal / 2 (they round to zero);
#   **non-finite** count (NaN/inf);
# - the **amax history**: *delayed scaling* (Transformer Engine's default) takes the scale from
#   $\max(\text{amax history})/\text{max}$ of previous steps — cheap, but a sudden spike overflows.
#   DeepSeek's *online* scaling computes each tile's amax on the fly, so nothing overflows by construction;
# - the global **gradient norm** and which parameters have non-finite gradients.

# %% [solution id=ex_04_3_monitor]
class StabilityMonitor:
    """Overflow/underflow/NaN counts, amax history and gradient health for FP8 training."""

    def __init__(self, fmt: FP8Format | str = "e4m3", history: int = 16) -> None:
        self.fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        f = self.fmt
        top_step = 2.0 ** (math.floor(math.log2(f.max)) - f.man_bits)  # tick spacing of the top binade
        self.overflow_above = f.max + top_step / 2  # |x/scale| above this cannot round to max: it saturates (464 for E4M3)
        self.underflow_at_or_below = f.min_subnormal / 2  # |x/scale| at or below this rounds to zero
        self.amax_history = defaultdict(lambda: deque(maxlen=history))  # name -> recent amax values
        self.alerts: list[tuple[str, str, int]] = []  # (tensor name, kind, count)

    def observe(self, name: str, x: torch.Tensor, scale: float = 1.0) -> dict:
        """Statistics of ``x / scale`` against the format.

        Returns {"amax": max |x| over finite entries (0.0 if none), "overflow": finite entries with
        |x/scale| > self.overflow_above, "underflow": nonzero finite entries with |x/scale| <= self.underflow_at_or_below,
        "nonfinite": NaN/inf entries} (counts as ints). Appends amax to self.amax_history[name]; appends (name, kind, count) to self.alerts
        for each of overflow, underflow, nonfinite that is nonzero.
        """
        ### BEGIN SOLUTION
        x = x.detach().float()
        finite = torch.isfinite(x)
        a = (x / scale).abs()
        stats = {
            "amax": float(x[finite].abs().max()) if bool(finite.any()) else 0.0,
            "overflow": int((finite & (a > self.overflow_above)).sum()),
            "underflow": int((finite & (x != 0) & (a <= self.underflow_at_or_below)).sum()),
            "nonfinite": int((~finite).sum()),
        }
        self.amax_history[name].append(stats["amax"])
        for kind in ("overflow", "underflow", "nonfinite"):
            if stats[kind]:
                self.alerts.append((name, kind, stats[kind]))
        return stats
        ### END SOLUTION

    def delayed_scale(self, name: str) -> float:
        """Delayed scaling: max of the amax history of ``name`` divided by fmt.max (1.0 when there is no history)."""
        ### BEGIN SOLUTION
        hist = self.amax_history.get(name)
        if not hist:
            return 1.0
        return max(hist) / self.fmt.max
        ### END SOLUTION

    def check_gradients(self, model: nn.Module) -> dict:
        """{"grad_norm": L2 norm over all parameter gradients (float; inf/NaN if any is non-finite),
        "nonfinite": names of parameters whose gradient holds NaN/inf}. Adds a (name, "nonfinite grad", count) alert for each."""
        ### BEGIN SOLUTION
        sq, bad = 0.0, []
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            n_bad = int((~torch.isfinite(g)).sum())
            if n_bad:
                bad.append(name)
                self.alerts.append((name, "nonfinite grad", n_bad))
            sq += float(g.pow(2).sum())
        return {"grad_norm": math.sqrt(sq) if math.isfinite(sq) else sq, "nonfinite": bad}
        ### END SOLUTION

    def diagnose(self) -> list[str]:
        """What to do about each kind of alert seen so far."""
        advice = {
            "overflow": "values above the FP8 range saturate: use online (current) scaling, or a finer granularity (1x128 tiles)",
            "underflow": "values flush to zero: the scale is set by a far larger outlier; use per-tile scales (or E5M2 for range)",
            "nonfinite": "NaN/inf in an activation: find the first layer that produces it; check the amax floor and divisions",
            "nonfinite grad": "NaN/inf gradients: skip the step (loss scaler), lower the learning rate, check the loss for log(0)",
        }
        seen = sorted({kind for _, kind, _ in self.alerts})
        return [f"{kind}: {advice[kind]} (tensors: {sorted({n for n, k, _ in self.alerts if k == kind})})" for kind in seen]


# %% [test id=test_04_3_monitor points=1]
from course_lib.testing import assert_true

mon = StabilityMonitor("e4m3")
st = mon.observe("act", torch.tensor([1.0, -500.0, 1e-4, 0.0, float("nan")]))
assert_true(st["overflow"] == 1 and st["nonfinite"] == 1, f"expected 1 overflow (|-500| > 464) and 1 NaN, got {st}")
assert_true(st["underflow"] == 1, f"1e-4 < 2^-10 rounds to zero in E4M3: expected 1 underflow, got {st['underflow']}")
assert_true(st["amax"] == 500.0, f"amax over finite values should be 500, got {st['amax']}")
assert_true(list(mon.amax_history["act"]) == [500.0], "observe should record amax in amax_history[name]")
print("monitor: visible checks passed")

# %% [test id=test_04_3_monitor_hidden points=2]
# Hidden tests: run when your notebook is graded (also by `make check`).
### BEGIN HIDDEN TESTS
import math as _m
import torch as _t
from course_lib.testing import assert_true as _at

_g = _t.Generator().manual_seed(46)
for _fmt in ("e4m3", "e5m2"):
    _mon = StabilityMonitor(_fmt, history=4)
    _f = _mon.fmt
    _x = _t.randn(5000, generator=_g) * 10 ** _t.empty(5000).uniform_(-8, 6, generator=_g)
    _x[::97] = _m.nan
    _x[::101] = _m.inf
    _x[::103] = 0.0
    _sc = 3.0
    _st = _mon.observe("x", _x, scale=_sc)
    _fin = _t.isfinite(_x)
    _ax = (_x / _sc).abs()
    _over = {"e4m3": 464.0, "e5m2": 61440.0}[_fmt]  # max + half a step of the top binade
    _want = {"overflow": int((_fin & (_ax > _over)).sum()), "underflow": int((_fin & (_x != 0) & (_ax <= _f.min_subnormal / 2)).sum()),
             "nonfinite": int((~_fin).sum())}
    for _k, _v in _want.items():
        _at(_st[_k] == _v, f"{_fmt}: {_k} count {_st[_k]}, expected {_v}")
    _at(abs(_st["amax"] - float(_x[_fin].abs().max())) < 1e-6 * float(_x[_fin].abs().max()), f"{_fmt}: amax over finite values")
    _at({k for _, k, _ in _mon.alerts} == {"overflow", "underflow", "nonfinite"}, f"{_fmt}: one alert per nonzero kind")
    for _v in (9.0, 5.0, 2.0, 3.0, 4.0):
        _mon.observe("h", _t.tensor([_v]))
    _at(list(_mon.amax_history["h"]) == [5.0, 2.0, 3.0, 4.0], "the amax history keeps the last `history` values")
    _at(abs(_mon.delayed_scale("h") - 5.0 / _f.max) < 1e-12, "delayed scale = max(amax history) / fmt.max (not the latest amax)")
    # edges: half the smallest subnormal rounds to zero (tie to even); max + half a top step rounds down for E4M3
    _half = _f.min_subnormal / 2
    _st = _mon.observe("edge", _t.tensor([_half, _half * 1.01, -_half]))
    _at(_st["underflow"] == 2, f"{_fmt}: exactly half the smallest subnormal rounds to zero (underflow), got {_st['underflow']} of 2")
    _at(_mon.delayed_scale("never seen") == 1.0, "no history -> scale 1.0")
_st = StabilityMonitor("e4m3").observe("edge", _t.tensor([464.0, 464.5, -470.0]))
_at(_st["overflow"] == 2, f"E4M3: 464 still rounds to 448; 464.5 and -470 saturate: expected 2 overflows, got {_st['overflow']}")
# a spike overflows under delayed scaling, never under online scaling
_mon = StabilityMonitor("e4m3")
for _ in range(8):
    _mon.observe("a", _t.randn(1024, generator=_g))
_spike = _t.randn(1024, generator=_g) * 100
_st_delayed = _mon.observe("a", _spike, scale=_mon.delayed_scale("a"))
_st_online = _mon.observe("a2", _spike, scale=float(_spike.abs().max()) / 448)
_at(_st_delayed["overflow"] > 0 and _st_online["overflow"] == 0, "a 100x spike should overflow with the delayed scale only")
# gradients
_net = _t.nn.Sequential(_t.nn.Linear(4, 3), _t.nn.Linear(3, 2))
_net(_t.randn(5, 4, generator=_g)).sum().backward()
_want_norm = _m.sqrt(sum(float(p.grad.pow(2).sum()) for p in _net.parameters()))
_r = _mon.check_gradients(_net)
_at(abs(_r["grad_norm"] - _want_norm) < 1e-5 * _want_norm and _r["nonfinite"] == [], f"gradient norm {_r['grad_norm']} vs {_want_norm}")
_net[1].weight.grad[0, 0] = _m.nan
_r = _mon.check_gradients(_net)
_at(_r["nonfinite"] == ["1.weight"], f"non-finite gradients should be reported by name, got {_r['nonfinite']}")
_at(not _m.isfinite(_r["grad_norm"]), "a NaN gradient makes the norm non-finite")
_at(any("nonfinite grad" in line for line in _mon.diagnose()), "diagnose should mention the non-finite gradient")
print("monitor: hidden checks passed")
### END HIDDEN TESTS

# %% [markdown]
# **Checkpoint:** your monitor tells an overflow from an underflow and points at the parameter whose gradient
# went non-finite.
#
# **Delayed vs online scaling.** An activation whose amax drifts slowly, then spikes 30x for one step. Delayed
# scaling (scale from the last 16 steps' amax) saturates the spike; online scaling, as DeepSeek's, cannot.

# %% [code]
g = torch.Generator().manual_seed(0)
mon = StabilityMonitor("e4m3", history=16)
steps_m = 60
overflow_delayed, overflow_online, amax_seen = [], [], []
for step in range(steps_m):
    level = 1.0 + step / 30 + (30.0 if step == 40 else 0.0)
    act = torch.randn(4096, generator=g) * level
    try:
        delayed = mon.delayed_scale("act")
        st_d = mon.observe("act", act, scale=delayed)
        st_o = mon.observe("act (online)", act, scale=float(act.abs().max()) / 448)
    except NotImplementedError:
        print("(finish exercise 4.3 (StabilityMonitor) to see this figure)")
        break
    overflow_delayed.append(st_d["overflow"])
    overflow_online.append(st_o["overflow"])
    amax_seen.append(st_d["amax"])
if overflow_delayed:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].plot(amax_seen)
    axes[0].set(xlabel="step", ylabel="amax", yscale="log", title="Activation amax (spike at step 40)")
    axes[1].plot(overflow_delayed, label="delayed scaling (history of 16)")
    axes[1].plot(overflow_online, label="online scaling (DeepSeek)", ls="--")
    axes[1].set(xlabel="step", ylabel="saturated values (of 4096)", title="Overflows per step")
    axes[1].legend(fontsize=8)
    plt.show()
    for line in mon.diagnose():
        print("-", line)

# %% [markdown]
# ## Interactive precision tuning
#
# Pick the format, the tile width (or one scale per tensor) and the outlier magnitude, and see the error
# distribution and the SQNR of the ordinary values. In JupyterLab these are sliders; headless, the first
# choice of each is drawn.

# %% [code]
def precision_explorer(fmt: str = "e4m3", tile: object = 128, outlier_scale: float = 1e4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1024, generator=g)
    mask = torch.rand(x.shape, generator=g) < 1e-3
    x = torch.where(mask, x * outlier_scale, x)
    conv = FP8Converter(fmt, tile=128 if tile == "tensor" else int(tile))
    try:
        xh = conv.dequantize(*conv.quantize(x, "tensor" if tile == "tensor" else "tile"))  # your quantiser
    except NotImplementedError:
        print("(finish exercise 4.1 (FP8Converter.quantize / dequantize) to see this figure)")
        return
    rel = ((xh - x).abs() / x.abs().clamp_min(1e-12))[~mask]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(np.log10(rel.clamp_min(1e-8).numpy()), bins=80)
    ax.set(xlabel="log10 relative error of ordinary values (exact ones at -8)", ylabel="count",
           title=f"{fmt}, scale per {'tensor' if tile == 'tensor' else f'1x{tile} tile'}, outliers x{outlier_scale:g}: "
                 f"SQNR {sqnr_db(x, xh, ~mask):.1f} dB")
    plt.show()


viz.interactive(precision_explorer, fmt=["e4m3", "e5m2"], tile=[128, 32, 512, "tensor"], outlier_scale=[1e4, 1.0, 1e2, 1e6])

# %% [markdown]
# ## On a GPU
#
# On CUDA devices with FP8 tensor cores (compute capability $\ge$ 8.9) `course_lib.deepseek.fp8.scaled_matmul`
# runs `torch._scaled_mm`: DeepSeek's block-wise scaling where torch and the GPU support it (Hopper,
# cuBLASLt $\ge$ 12.9: A scales $(M, K/128)$ column-major, B scales $(K/128, N/128)$ column-major), else row-wise,
# else tensor-wise. `make gpu-check` measures all of them; on an H100 with torch 2.11 at $8192^3$ (median of
# 20): BF16 778, FP8 tensor-wise 1412, row-wise 1380 and block-wise 1162 TFLOP/s — block-wise FP8 is 1.49x
# BF16, paying ~18 % against tensor-wise for its per-tile scales.

# %% [code]
from course_lib.utils import has_fp8_tensor_cores


def scaled_mm_recipes() -> list[str]:
    """The scalings torch._scaled_mm runs on this GPU, each checked against your dequantise-then-matmul."""
    M, N, K = 128, 256, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", generator=gen)
    b = torch.randn(N, K, device="cuda", generator=gen)

    def col(t):  # a column-major copy, as cuBLASLt wants block-wise scales
        return t.t().contiguous().t()

    recipes = {  # name: (tile of the converter, a's granularity, b's granularity, scale layouts for _scaled_mm)
        "blockwise": (128, "tile", "block", lambda sa, sb: (col(sa), sb.contiguous().t())),  # (M, K/128), (K/128, N/128)
        "rowwise": (K, "tile", "tile", lambda sa, sb: (sa.contiguous(), sb.reshape(1, N).contiguous())),  # (M, 1), (1, N)
        "tensorwise": (128, "tensor", "tensor", lambda sa, sb: (sa, sb)),
    }
    ok = []
    for name, (tile, ga, gb, layout) in recipes.items():
        conv = FP8Converter("e4m3", tile=tile)
        aq, sa = conv.quantize(a, ga)
        bq, sb = conv.quantize(b, gb)
        want = conv.dequantize(aq, sa) @ conv.dequantize(bq, sb).T
        scale_a, scale_b = layout(sa, sb)
        try:
            y = torch._scaled_mm(aq, bq.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            continue
        if float((y.float() - want).abs().max()) <= 0.02 * float(want.abs().max()):
            ok.append(name)
    return ok


if has_fp8_tensor_cores():
    recipes = yours_or_placeholder(scaled_mm_recipes, "exercise 4.1 (FP8Converter.quantize / dequantize)")
    if recipes is not None:
        print("FP8 recipes torch._scaled_mm runs on this GPU (checked against your quantiser):", recipes)
    print("run `make gpu-check` for the full table of TFLOP/s")
else:
    print("no FP8 tensor cores here: the course emulates the FP8 GEMMs exactly (same numbers, no speed-up)")

# %% [markdown]
# ## Optional challenge (ungraded)
#
# 1. Replace the amax scale by a power of two ($2^{\lceil\log_2(\text{amax}/448)\rceil}$, DeepSeek's `ue8m0`
#    option): multiplying by it is exact. How much SQNR does it cost on Gaussian data?
# 2. Train the precision study with E5M2 gradients (`grad_fmt`) instead of E4M3 and compare the final loss.
# 3. Emulate the Wgrad GEMM with *delayed* scaling (scales from the amax history) and find the learning rate
#    at which the stability monitor starts reporting overflows.
#
# ## Quiz
#
# **Q1.** DeepSeek-V3 uses E4M3 for the gradients too, where earlier FP8 recipes used E5M2 (more range). Why
# does that work?
# (a) gradients never exceed 448 — (b) fine-grained 1x128/128x128 scales supply the range locally, so the extra
# mantissa bit wins — (c) E4M3 has infinities — (d) the loss scaler removes the need for range
#
# **Q2.** An activation of shape (4096, 7168) quantised in DeepSeek's 1x128 tiles has a scale tensor of shape:
# (a) (4096, 1) — (b) (32, 56) — (c) (4096, 56) — (d) (56, 4096)
#
# **Q3.** With one scale per tensor and a single value 10^5 times larger than the rest, the ordinary values:
# (a) keep ~31 dB SQNR — (b) overflow to NaN — (c) fall into the subnormals or to zero, so their SQNR collapses —
# (d) are unaffected because E4M3 is floating point
#
# **Q4.** Why does DeepSeek promote partial sums to FP32 every $N_C = 128$ elements?
# (a) FP8 products are inexact — (b) the tensor cores' accumulator keeps ~14 bits, so the error grows with K —
# (c) to apply the loss scale — (d) to convert E5M2 to E4M3
#
# **Q5.** With `torch.amp.GradScaler` defaults, an overflow at step 100 and none after: the scale at step 100 is
# $2^{15}$; when is it $2^{16}$ again?
# (a) never — (b) at the next step — (c) after 2000 clean steps — (d) after 65536 steps
#
# Write each answer as a single letter string.

# %% [solution id=quiz_04_answers]
### BEGIN SOLUTION
ANSWER_Q1 = "b"
ANSWER_Q2 = "c"
ANSWER_Q3 = "c"
ANSWER_Q4 = "b"
ANSWER_Q5 = "c"
### END SOLUTION

# %% [test id=test_04_quiz points=5]
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4, ANSWER_Q5], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [markdown]
# ## Summary
#
# - E4M3: bias 7, max 448, min normal $2^{-6}$, min subnormal $2^{-9}$, no inf; E5M2: bias 15, max 57344, inf.
#   Round half to even; clamp before every cast.
# - Scale $= \max(\text{amax}, 10^{-4})/448$, stored as the dequantisation factor; DeepSeek: 1x128 tiles for
#   activations and gradients, 128x128 blocks for weights, computed online every step.
# - Fine-grained scales keep outliers local (SQNR of ordinary values: ~26 dB per tile vs ~8 dB per tensor at
#   0.1 % outliers x $10^5$).
# - The GEMM dequantises each 128-wide K-slice and promotes it to FP32: the ~14-bit tensor-core accumulator
#   otherwise loses accuracy as K grows.
# - Fprop, Dgrad and Wgrad all take FP8; master weights, gradients, norms, embedding, head stay high precision.
# - FP16 needs dynamic loss scaling ($2^{16}$, x0.5 + skip on overflow, x2 after 2000 clean steps); BF16 does not.
#
# ## Troubleshooting
#
# | error / symptom | likely cause | fix |
# |---|---|---|
# | decode disagrees with torch on codes 0x01-0x07 | subnormals decoded with the implicit 1 | for exponent field 0 use $2^{1-\text{bias}}\, m/2^M$ |
# | encode off by one code at exact midpoints | `floor(x + 0.5)` rounds half up | `torch.round` (half to even) on $x$ / spacing |
# | NaN in quantised output, no NaN in input | no clamping before the cast, or an all-zero tile divided by 0 | clamp to $\pm$max; floor amax at $10^{-4}$ |
# | tile's max code is 127, not 448 | scale = amax/127 (the int8 range) | scale = amax / fmt.max |
# | dequantised values wildly off | scale stored as its reciprocal | store amax/448 and multiply to dequantise |
# | "scale ... shape (M, 1)" | one scale per row or tensor | reshape to (M, K/128, 128) and reduce the last axis |
# | Wgrad far from the reference | reused the forward's tiles along K | re-tile $\partial y^\top$ and $x^\top$ along the tokens |
# | fp16 loss stuck, every step skipped | scale never shrinks, or clipping before unscaling | halve on overflow; unscale, then clip |
# | fp16 scale stays low forever | growth counter not incremented / reset on growth | count clean steps; double at 2000 |
#
# ## What comes next
#
# Section 5 assembles MLA (Section 2) and DeepSeekMoE (Section 3) into `DeepSeekV3Mini` blocks and trains it
# end to end — with the FP8 linear layers of this section as an option for the expert and attention projections.
