# %% [markdown]
# # Section 4 — FP8 mixed-precision training
#
# DeepSeek-V3 was the first model at its scale trained with **FP8 GEMMs**: every large matrix product of
# the forward pass (Fprop) and of both backward GEMMs (Dgrad, Wgrad) reads 8-bit floats. That halves the
# bytes each GEMM moves compared to BF16 and, on Hopper tensor cores, raises peak throughput. Eight bits
# hold a 3-bit mantissa and a 4-bit exponent, so the recipe lives or dies by **scaling**: DeepSeek gives every
# 1x128 tile of activations and every 128x128 block of weights its own scale, and promotes partial sums
# to FP32 every 128 products. The paper reports a training loss within 0.25 % of the BF16 baseline.
#
# **You will**
# - encode E4M3/E5M2 at the bit level in four checked steps (binade, round-to-nearest-even, fields with
#   subnormals, saturation and NaN) and match torch's `float8` dtypes on all 256 codes (decoding is given);
# - quantise with per-tensor, per-1x128-tile and per-128x128-block scales and measure why tiles win when
#   activations have outliers;
# - emulate DeepSeek's fine-grained FP8 GEMM, and show the accumulation error growing with K until partial
#   sums are promoted to FP32;
# - write an FP8 linear layer whose Fprop, Dgrad and Wgrad all run on FP8 inputs, a mixed-precision trainer
#   (BF16 autocast, FP16 with dynamic loss scaling) and a stability monitor.
#
# **Time:** core path about 260 min; deep dives 80 min.
#
# **Prerequisites:** floating-point representation
# (Section 1.4), autograd (`torch.autograd.Function`), a training loop.

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
from course_lib.deepseek.fp8_formats import E4M3, E5M2, FORMATS, FP8Format, decode, round_to_bits, sqnr_db

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
# an all-zero block stays finite). The stored scale is the *dequantisation* factor, as in Section 1.4: divide
# to quantise, multiply to get the value back:
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
# **Decoding is Section 1's.** Section 1.4 had you decode one code at a time (`decode_fp8`, graded there). This
# section does not ask for it again: `decode(codes, fmt)` from `course_lib.deepseek.fp8_formats` is the same rule
# vectorised over a tensor of codes, and `FP8Converter.decode` below calls it.
#
# **Encoding** — the other direction, a real number to the code of its nearest FP8 value — is new. You build it
# in four steps, each checked on its own, all at the **bit level** (integer and float arithmetic on ordinary
# tensors: the checks compare you against torch's float8 dtypes, so don't use them here). Each step works on
# magnitudes $a = |x|$ in float64, where every FP8 value and every midpoint between two of them is exact:
#
# ```
#  x = -1.3 in E4M3      sign bit 1, a = 1.3
#  step 1  binade        e = floor(log2 a) = 0 (never below 1 - bias = -6)     tick spacing 2^(e - M) = 1/8
#  step 2  round         a / spacing = 10.4 -> 10 (a tie would go to the even one)           q = 10/8 = 1.25
#  step 3  fields        q = 2^0 x (1 + 2/8): exponent field 0 + bias = 7 (0111), mantissa 2 (010)
#  step 4  code          1 | 0111 | 010 = 0xba;  plus saturation, overflow and NaN
# ```
#
# **Step 1: the binade.** The ticks of a binade $[2^e, 2^{e+1})$ are $2^{e-M}$ apart. Below the smallest normal
# $2^{1-\text{bias}}$ the subnormals keep that lowest binade's spacing: that is what "never below $1-\text{bias}$"
# buys.

# %% [solution id=ex_04_1_binade]
#@save
def fp8_binade(a: torch.Tensor, fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 of encoding: the binade of each magnitude and the tick spacing there.

    a: float64 tensor of finite magnitudes >= 0, any shape. fmt: E4M3 or E5M2.
    Returns (e, spacing), both of a's shape: e (int64) = floor(log2 a), never below the subnormals'
    1 - fmt.bias (0 sits in that lowest binade too); spacing (float64) = 2^(e - fmt.man_bits).
    """
    ### BEGIN SOLUTION
    _, exp = torch.frexp(a)  # a = frac * 2^exp with frac in [0.5, 1)
    e = (exp.to(torch.int64) - 1).clamp(min=1 - fmt.bias)  # subnormals share the lowest binade
    e = torch.where(a == 0, 1 - fmt.bias, e)  # frexp(0) = (0, 0): 0 belongs there too
    return e, torch.exp2((e - fmt.man_bits).to(torch.float64))
    ### END SOLUTION


# %% [test id=test_04_1_binade points=1.5]
# Checks you can run now. When graded, the judge runs these and more (1.5 points): every binade of E4M3 and E5M2 with its powers of two and the values just below them, subnormals and 0 in the lowest binade, the spacing, shapes and dtypes.
from course_lib.testing import assert_true

e, spacing = fp8_binade(torch.tensor([1.0, 1.3, 448.0, 2.0**-9, 0.0], dtype=torch.float64), E4M3)
assert_true(e.dtype == torch.int64, f"the binade should be int64, got {e.dtype}")
assert_true(e.tolist() == [0, 0, 8, -6, -6], f"E4M3 binades of [1, 1.3, 448, 2^-9, 0] should be [0, 0, 8, -6, -6], got {e.tolist()}",
            hint="floor(log2 a); the subnormals (and 0) share the lowest binade 1 - bias")
assert_true(spacing.tolist() == [1 / 8, 1 / 8, 32.0, 2.0**-9, 2.0**-9],
            f"E4M3 spacings should be [1/8, 1/8, 32, 2^-9, 2^-9], got {spacing.tolist()}", hint="2^(e - M), M mantissa bits")
print("fp8_binade: visible checks passed")

# %% [markdown]
# **Step 2: round to the nearest tick.** Divide by the spacing (exact: a power of two), round to an integer,
# multiply back. An exact tie goes to the even integer — the code whose mantissa ends in 0 — *round half to
# even*, which `torch.round` implements. No range limit yet: 470 in E4M3 rounds to 480, above the maximum 448
# (step 4 decides what happens to it).

# %% [solution id=ex_04_1_round]
#@save
def fp8_round(a: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Step 2 of encoding: each magnitude rounded to the nearest tick of its binade, ties to the even one.

    a: float64 tensor of finite magnitudes >= 0. Returns float64 of the same shape, each value a multiple of
    fp8_binade's spacing; no clamping (a magnitude above fmt.max may round above it).
    """
    ### BEGIN SOLUTION
    _, spacing = fp8_binade(a, fmt)
    return torch.round(a / spacing) * spacing  # half to even; exact in float64
    ### END SOLUTION


# %% [test id=test_04_1_round points=1.5]
# Checks you can run now. When graded, the judge runs these and more (1.5 points): every midpoint of E4M3 and E5M2 (half to even), float64 values a hair either side of each midpoint, dense random values, subnormals, values above max, the carry into the next binade.
from course_lib.testing import assert_true

q = fp8_round(torch.tensor([1.3, 1 + 1 / 16, 1 + 3 / 16, 1.97, 470.0, 3 * 2.0**-10], dtype=torch.float64), E4M3)
assert_true(q.dtype == torch.float64, f"fp8_round should return float64, got {q.dtype}")
assert_true(q.tolist() == [1.25, 1.0, 1.25, 2.0, 480.0, 2.0**-8],
            f"E4M3 rounding of [1.3, 1+1/16, 1+3/16, 1.97, 470, 3x2^-10] should be [1.25, 1, 1.25, 2, 480, 2^-8], got {q.tolist()}",
            hint="1 + 1/16 and 1 + 3/16 are ties: they go to the tick whose integer (a / spacing) is even")
print("fp8_round: visible checks passed")

# %% [markdown]
# **Step 3: the fields of a representable value.** A rounded magnitude $q$ is now exactly an FP8 value; write it
# as the fields the decoder reads back. Take its binade from $q$ itself, not from $a$: rounding can carry into
# the next binade (1.97 rounds to 2.0, exponent 1, mantissa 0 — not exponent 0 with a mantissa of 8, which does
# not fit in 3 bits). Subnormals (and 0) have exponent field 0 and count the smallest subnormal.

# %% [solution id=ex_04_1_fields]
#@save
def fp8_fields(q: torch.Tensor, fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 of encoding: exponent and mantissa fields of magnitudes that fmt represents exactly.

    q: float64 tensor, each entry 0 or a finite positive fmt value <= fmt.max (fp8_round's output, once in range).
    Returns (exp_field, mantissa), int64, q's shape: a normal q (>= fmt.min_normal) has exponent field
    binade + bias and as mantissa the M bits after its leading 1; a subnormal q (or 0) has exponent field 0
    and as mantissa q counted in smallest subnormals.
    """
    ### BEGIN SOLUTION
    e, _ = fp8_binade(q, fmt)  # the binade of q itself: a carry is already in it
    normal = q >= fmt.min_normal
    exp_field = torch.where(normal, e + fmt.bias, torch.zeros_like(e))
    mant = torch.where(normal, (q / torch.exp2(e.to(torch.float64)) - 1.0) * 2**fmt.man_bits, q / fmt.min_subnormal)
    return exp_field, mant.round().to(torch.int64)
    ### END SOLUTION


# %% [test id=test_04_1_fields points=1.5]
# Checks you can run now. When graded, the judge runs these and more (1.5 points): the fields of every finite positive value of E4M3 and E5M2 against its code, 0, subnormals, the top binade, shapes and int64.
from course_lib.testing import assert_true

ef, mf = fp8_fields(torch.tensor([1.25, 2.0, 448.0, 2.0**-9, 2.0**-6, 0.0], dtype=torch.float64), E4M3)
assert_true(ef.dtype == torch.int64 and mf.dtype == torch.int64, f"both fields should be int64, got {ef.dtype}, {mf.dtype}")
assert_true(ef.tolist() == [7, 8, 15, 0, 1, 0], f"E4M3 exponent fields of [1.25, 2, 448, 2^-9, 2^-6, 0] should be "
            f"[7, 8, 15, 0, 1, 0], got {ef.tolist()}", hint="binade + bias (7) for normals; 0 for subnormals and 0")
assert_true(mf.tolist() == [2, 0, 6, 1, 0, 0], f"E4M3 mantissas should be [2, 0, 6, 1, 0, 0], got {mf.tolist()}",
            hint="normal: the bits after the leading 1, (q / 2^e - 1) x 2^M; subnormal: q / 2^-9")
print("fp8_fields: visible checks passed")

# %% [markdown]
# **Step 4: the code, and the converter.** `FP8Converter.encode` puts the steps together: the sign bit (`-0.0`
# has one too), saturation (`saturate=True` clamps to $\pm$max first, infinities included), then steps 1-3, then
# what has no ordinary code — a magnitude that rounds above max without saturation is inf in E5M2 and NaN in E4M3,
# and NaN stays NaN. The same class then quantises with scales: `quantize` and `dequantize` (there, cast with
# `.to(fmt.torch_dtype)` after clamping; the codec is the part you write bit by bit).

# %% [solution id=ex_04_1_converter]
#@save
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
        format's NaN codes, +-inf for E5M2's infinity codes. Given (Section 1.4 had you write it).
        """
        return decode(codes, self.fmt)  # given: Section 1.4's decoder, vectorised

    def encode(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        """Step 4 of encoding: codes of ``x`` rounded to the nearest representable value, ties to the even mantissa.

        x: float tensor of any shape (read exactly in float64); use fp8_round and fp8_fields. Returns uint8 codes, same shape.
        saturate=True: clamp to +-max first (infinities too). saturate=False: magnitudes that round above max
        become inf (E5M2, code S.11111.00) or NaN (E4M3, code S.1111.111). NaN maps to a NaN code.
        """
        ### BEGIN SOLUTION
        f = self.fmt
        x = x.detach().to(torch.float64)
        sign = torch.signbit(x).to(torch.int64)
        a = x.abs()
        if saturate:
            a = a.clamp(max=f.max)  # infinities too; NaN stays NaN
        q = fp8_round(torch.where(torch.isfinite(a), a, torch.zeros_like(a)), f)  # steps 1-2 (finite magnitudes only)
        ok = torch.isfinite(a) & (q <= f.max)  # False for overflow, inf and NaN
        exp_field, mant = fp8_fields(torch.where(ok, q, torch.zeros_like(q)), f)  # step 3
        code = (sign << 7) | (exp_field << f.man_bits) | mant
        overflow = f.inf_code if f.has_inf else f.nan_code  # inf for E5M2, NaN for E4M3
        code = torch.where(ok, code, (sign << 7) | overflow)
        code = torch.where(torch.isnan(x), (sign << 7) | f.nan_code, code)
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


# %% [test id=test_04_1_encode points=3]
# Checks you can run now. When graded, the judge runs these and more (3 points): every tie (half to even), dense random values, -0.0 and every code's round trip against torch's clamped cast, x read exactly in float64, overflow with and without saturation (E5M2 inf, E4M3 NaN), infinities, NaN codes, shapes, no float8 casts.
from course_lib.testing import assert_close, assert_true

conv = FP8Converter("e4m3")
codes = conv.encode(torch.tensor([1.0, -2.0, 448.0, 0.0, 2.0**-9, -1.3]))
assert_true(codes.dtype == torch.uint8, f"encode should return uint8 codes, got {codes.dtype}")
assert_true(codes.tolist() == [0x38, 0xC0, 0x7E, 0x00, 0x01, 0xBA],
            f"E4M3 codes of [1, -2, 448, 0, 2^-9, -1.3] should be [0x38, 0xc0, 0x7e, 0x0, 0x1, 0xba], got {[hex(c) for c in codes.tolist()]}",
            hint="sign in bit 7, exponent field (bias 7) in bits 6-3, mantissa in bits 2-0; 2^-9 is subnormal")
assert_true(conv.encode(torch.tensor([-0.0])).item() == 0x80, "-0.0 keeps its sign bit: code 0x80", hint="torch.signbit sees the sign of -0.0")
assert_true(conv.encode(torch.tensor([1000.0])).item() == 0x7E, "1000 must saturate to 448 (0x7e) when saturate=True")
assert_true(conv.encode(torch.tensor([1000.0]), saturate=False).item() == 0x7F,
            "without saturation, 1000 has no E4M3 code: NaN (0x7f), since E4M3 has no infinity")
assert_true(bool(torch.isnan(conv.decode(conv.encode(torch.tensor([float("nan")])))).all()), "NaN must encode to a NaN code")
print("encode: visible checks passed")

# %% [test id=test_04_1_quantize points=6]
# Checks you can run now. When graded, the judge runs these and more (6 points): tile scales = max(amax, 1e-4) / 448 per 1x128 tile (not amax/127, not reciprocal, not per tensor), codes = x / scale clamped and cast, 128x128 block scales, tensor-wise scales, dequantize of every layout, a given scale reused, NaN kept in its tile, SQNR with outliers.
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


yours_or_placeholder(rounding_error_figure, "exercise 4.1 (fp8_binade, fp8_round, fp8_fields, FP8Converter.encode)")

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
#@save
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


# %% [test id=test_04_1_gemm points=4.5]
# Checks you can run now. When graded, the judge runs these and more (4.5 points): fp8_gemm with 1x128 x 128x128 and 1x128 x 1x128 scales against dequantise-then-matmul in float64 (odd M); accumulate against the reference simulation: truncation after every addition, promotion every N_C = 128 (and every promote_every), the last partial sum; the error falls >5x with promotion.
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
    for K in Ks:
        a8 = to_e4m3_values(torch.randn(8, K, generator=g) * 4)
        b8 = to_e4m3_values(torch.randn(8, K, generator=g) * 4)
        exact = a8.double() @ b8.double().T
        for name, (bits, promote) in settings.items():
            out = accumulate(a8, b8, bits, promote)  # your simulation
            curves[name].append(float(((out - exact).abs() / exact.abs()).median()))
        fp32_max.append(float(((accumulate(a8, b8, 23, None) - exact).abs() / exact.abs()).max()))
    print(f"{'K':>6}{'14-bit':>12}{'promoted':>12}{'FP32 (max)':>12}   median relative error of the 8x8 outputs")
    for i, K in enumerate(Ks):
        print(f"{K:>6}{curves['14-bit accumulator'][i]:>12.2e}{curves['14-bit + FP32 promotion every 128'][i]:>12.2e}"
              f"{fp32_max[i]:>12.1e}")
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
#@save
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
#@save
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


# %% [test id=test_04_1_linear points=6]
# Checks you can run now. When graded, the judge runs these and more (6 points): Fprop, Dgrad and Wgrad against DeepSeek's recipe (E4M3 everywhere, x and dy in 1x128 tiles, W in 128x128 blocks reused transposed by Dgrad, dy^T and the cached x^T re-tiled along the tokens for Wgrad) for 2-D and 3-D inputs; ~4% from FP32; bf16 in, bf16 out; FP32 weight gradient; the master weight untouched.
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


# %% [test id=test_04_2_trainer points=6]
# Checks you can run now. When graded, the judge runs these and more (6 points): LossScaler's trajectory (x0.5 on overflow, x2 after growth_interval clean steps, the counter reset), unscale_; 20 fp16 steps against torch.amp.GradScaler (scale, skipped steps, parameters, clipping after unscaling, the unscaled loss and gradient norm); bf16 autocast and fp8 linears with FP32 master weights.
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
    print("DeepSeek-V3 training also keeps per parameter: FP32 master weight (4 B), FP32 gradient, BF16 AdamW moments (2 x 2 B)")


yours_or_placeholder(memory_figure, "exercise 4.1 (FP8Converter.quantize)")

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
            "underflow": "values flush to zero: the scale is set by a far larger outlier; use per-tile scales (DeepSeek-V3 gets range from fine-grained scales, not from E5M2)",
            "nonfinite": "NaN/inf in an activation: find the first layer that produces it; check the amax floor and divisions",
            "nonfinite grad": "NaN/inf gradients: skip the step (loss scaler), lower the learning rate, check the loss for log(0)",
        }
        seen = sorted({kind for _, kind, _ in self.alerts})
        return [f"{kind}: {advice[kind]} (tensors: {sorted({n for n, k, _ in self.alerts if k == kind})})" for kind in seen]


# %% [test id=test_04_3_monitor points=4.5]
# Checks you can run now. When graded, the judge runs these and more (4.5 points): overflow (|x/scale| above max + half a top step), underflow (nonzero, at or below half the smallest subnormal) and NaN/inf counts in E4M3 and E5M2 with their rounding edges, amax over finite values, alerts, the amax history and delayed scale, a spike under delayed vs online scaling, the global gradient norm (with its square root), non-finite gradients by name, diagnose.
from course_lib.testing import assert_true

mon = StabilityMonitor("e4m3")
st = mon.observe("act", torch.tensor([1.0, -500.0, 1e-4, 0.0, float("nan")]))
assert_true(st["overflow"] == 1 and st["nonfinite"] == 1, f"expected 1 overflow (|-500| > 464) and 1 NaN, got {st}")
assert_true(st["underflow"] == 1, f"1e-4 < 2^-10 rounds to zero in E4M3: expected 1 underflow, got {st['underflow']}")
assert_true(st["amax"] == 500.0, f"amax over finite values should be 500, got {st['amax']}")
assert_true(list(mon.amax_history["act"]) == [500.0], "observe should record amax in amax_history[name]")
print("monitor: visible checks passed")

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
# ## Deep dive: interactive precision tuning (about 1 min)
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
# ## Deep dive: on a GPU (about 1 min)
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
            y = torch._scaled_mm(aq.contiguous(), bq.contiguous().t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
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
# 2. Quantise the gradients of the precision study to E5M2 instead of E4M3 (give your backward's quantiser a
#    format argument) and compare the final loss: why does DeepSeek-V3 keep E4M3 for gradients too?
# 3. Emulate the Wgrad GEMM with *delayed* scaling (scales from the amax history) and find the learning rate
#    at which the stability monitor starts reporting overflows.
#
# Each challenge has a cell below for your attempt (ungraded; the worked solutions show one way).

# %% [solution id=ex_04_challenge_1_pow2_scale]
def pow2_scale_sqnr(x: torch.Tensor) -> tuple[float, float]:
    """Challenge 1: SQNR (dB) of 1x128-tile E4M3 quantisation of x with amax/448 scales and with power-of-two scales."""
    ### BEGIN SOLUTION
    e4m3 = FP8Converter("e4m3")
    x_q, s = e4m3.quantize(x, "tile")
    s2 = torch.exp2(torch.ceil(torch.log2(s)))  # the power of two at or above amax/448: nothing saturates
    x_q2, _ = e4m3.quantize(x, "tile", scale=s2)
    return sqnr_db(x, e4m3.dequantize(x_q, s)), sqnr_db(x, e4m3.dequantize(x_q2, s2))
    ### END SOLUTION


# %% [code]
try:
    _exact, _pow2 = pow2_scale_sqnr(torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)))
    print(f"Gaussian activations, 1x128 tiles: amax/448 scales {_exact:.1f} dB, power-of-two scales {_pow2:.1f} dB "
          f"(only {_exact - _pow2:.1f} dB: a tile's amax now lands anywhere in (224, 448], and a float's relative precision "
          "hardly depends on where, so the exact power-of-two scales are nearly free)")
except NotImplementedError:
    print("(challenge 1: write pow2_scale_sqnr to measure the cost)")

# %% [solution id=ex_04_challenge_2_e5m2_grads]
def gradient_format_study(grad_fmt: str, steps: int, lr: float = 3e-3) -> float:
    """Challenge 2: mean loss of the last steps of the FP8 precision study with the gradients dy quantised to ``grad_fmt``."""
    ### BEGIN SOLUTION
    class _Fn(torch.autograd.Function):
        forward = staticmethod(FP8LinearFunction.forward)

        @staticmethod
        def backward(ctx, grad_y):
            x_q, x_s, w_q, w_s = ctx.saved_tensors
            conv, conv_g = FP8Converter("e4m3"), FP8Converter(grad_fmt)
            g = grad_y.reshape(-1, w_q.shape[0]).to(torch.float32)  # (M, N)
            g_q, g_s = conv_g.quantize(g, "tile")
            grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s.T)  # (M, K)
            gt_q, gt_s = conv_g.quantize(g.T.contiguous(), "tile")  # (N, M)
            xt_q, xt_s = conv.quantize(conv.dequantize(x_q, x_s).T.contiguous(), "tile")  # (K, M)
            return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), fp8_gemm(gt_q, gt_s, xt_q, xt_s)

    class _Linear(FP8Linear):
        def forward(self, x):
            return _Fn.apply(x, self.weight)

    torch.manual_seed(0)
    model = TinyLM()
    def _as_fp8(lin: nn.Linear) -> _Linear:
        layer = _Linear(lin.in_features, lin.out_features)
        layer.weight = lin.weight  # the same master weight
        return layer

    for mlp in model.mlps:
        mlp.w1, mlp.w2, mlp.w3 = _as_fp8(mlp.w1), _as_fp8(mlp.w2), _as_fp8(mlp.w3)
    trainer = MixedPrecisionTrainer(model, torch.optim.AdamW(model.parameters(), lr=lr), lm_loss, "fp32")
    batches = torch.Generator().manual_seed(1)  # the precision study's batches
    losses = [trainer.train_step(sample(128, batches))["loss"] for _ in range(steps)]
    last = losses[-max(5, steps // 10):]
    return sum(last) / len(last)
    ### END SOLUTION


# %% [code]
P, entropy, sample = bigram_task(seed=0)
try:
    _steps = sizes(8, 60)
    _final = {fmt: gradient_format_study(fmt, _steps) for fmt in ("e4m3", "e5m2")}
    print(f"after {_steps} steps: gradients in E4M3 {_final['e4m3']:.4f}, in E5M2 {_final['e5m2']:.4f} nats "
          f"({100 * (_final['e5m2'] - _final['e4m3']) / _final['e4m3']:+.2f}%): with 1x128 scales the range is local, so "
          "E5M2's extra exponent bit buys nothing here; at DeepSeek-V3's scale the extra mantissa bit of E4M3 won")
except NotImplementedError:
    print("(challenge 2: write gradient_format_study, after exercises 4.1 and 4.2)")

# %% [solution id=ex_04_challenge_3_delayed_wgrad]
def delayed_wgrad_overflows(lr: float, steps: int, history: int = 16) -> int:
    """Challenge 3: overflows of dy (the Wgrad GEMM's input) under delayed scaling, training the TinyLM at ``lr``."""
    ### BEGIN SOLUTION
    torch.manual_seed(0)
    model = TinyLM()
    mon = StabilityMonitor("e4m3", history=history)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads: list[torch.Tensor] = []
    hook = model.mlps[0].register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].detach()))
    batches = torch.Generator().manual_seed(1)
    overflows = 0
    for _ in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, sample(128, batches))
        if not torch.isfinite(loss):
            break
        loss.backward()
        dy = grads.pop()
        overflows += mon.observe("dy", dy, scale=mon.delayed_scale("dy"))["overflow"]  # the scale from past steps' amax
        opt.step()
    hook.remove()
    return overflows
    ### END SOLUTION


# %% [code]
try:
    _steps = sizes(6, 40)
    for _lr in (0.1, 1.0, 10.0):
        print(f"lr {_lr:>5}: {delayed_wgrad_overflows(_lr, _steps)} saturated gradient values in {_steps} steps with delayed scaling")
except NotImplementedError:
    print("(challenge 3: write delayed_wgrad_overflows, after exercise 4.3)")

# %% [markdown]
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
# Checks you can run now. When graded, the judge runs these and more (5 points): each answer is one letter 'a'..'d'; 1 point per correct answer.
for _n, _a in enumerate([ANSWER_Q1, ANSWER_Q2, ANSWER_Q3, ANSWER_Q4, ANSWER_Q5], 1):
    assert _a in ("a", "b", "c", "d"), f"ANSWER_Q{_n} must be one of 'a', 'b', 'c', 'd' (got {_a!r})"
print("quiz: answers well-formed")

# %% [given id=feedback_04_quiz]
#@quiz-feedback

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
# | encode wrong only for tiny values | subnormals given their own binades, or counted with an implicit 1 | below the smallest normal the spacing stays that of binade $1-\text{bias}$; exponent field 0 |
# | a code of 1.97 (or any value just under a power of two) is garbage | fields taken from the binade before rounding | rounding may carry: take the binade of the rounded value |
# | encode off by one code at exact midpoints | `floor(x + 0.5)` rounds half up | `torch.round` (half to even) on $x$ / spacing |
# | NaN in quantised output, no NaN in input | no clamping before the cast, or an all-zero tile divided by 0 | clamp to $\pm$max; floor amax at $10^{-4}$ |
# | tile's max code is 127, not 448 | scale = amax/127 (the int8 range) | scale = amax / fmt.max |
# | dequantised values wildly off | scale stored as its reciprocal | store amax/448 and multiply to dequantise |
# | "scale ... shape (M, 1)" | one scale per row or tensor | one scale per row *and* per 128 columns: group the columns into tiles before taking amax |
# | Wgrad far from the reference | reused the forward's tiles along K | re-tile $\partial y^\top$ and $x^\top$ along the tokens |
# | fp16 loss stuck, every step skipped | scale never shrinks, or clipping before unscaling | halve on overflow; unscale, then clip |
# | fp16 scale stays low forever | growth counter not incremented / reset on growth | count clean steps; double at 2000 |
#
# ## What comes next
#
# Section 5 assembles MLA (Section 2) and DeepSeekMoE (Section 3) into `DeepSeekV3Mini` blocks and trains it
# end to end — with the FP8 linear layers of this section as an option for the expert and attention projections.

# %% [markdown]
# ## Keep your parts
# The answer cells that start with `#@save` (your FP8 converter, GEMM and linear layer (with the given `FP8Linear` around it)) are yours to keep. Run the cell below after your last
# change: it writes the latest version of each into `my_deepseek/s04_fp8.py` beside your notebooks, and Section 5
# builds on them. Where a part is missing or fails a quick check, Section 5 says so in one line and uses the
# course's version (it always does while grading, so each section is graded on its own).

# %% [given]
from course_lib.learner import save_my_parts

my_parts_file = save_my_parts("04_fp8", header="""
import math

import torch
from torch import nn

from course_lib.deepseek.fp8_formats import E4M3, E5M2, FORMATS, FP8Format, decode, round_to_bits
""")
