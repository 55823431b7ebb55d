"""The given building blocks of Section 4 (FP8): the two formats, DeepSeek's constants, SQNR, accumulator rounding.

Section 4's notebook imports these in its given cells, so this module holds nothing Section 4 asks for:
no bit-level encoding, no quantiser, no GEMM, no loss scaler (those, the answers, are in
:mod:`course_lib.deepseek.fp8`, which re-exports everything here). Decoding is Section 1's exercise
(``decode_fp8``, one code at a time): Section 4 is given this vectorised ``decode`` instead, and Section 1's
kernel cannot import this module::

    FP8Format, E4M3, E5M2, FORMATS, get_format    the formats' fields (bias, max, min normal/subnormal, dtype)
    decode(codes, fmt)                            float32 values of uint8 codes (bit level)
    TILE, AMAX_FLOOR, N_C                         128-wide tiles, amax floor 1e-4, promotion every 128
    sqnr_db(x, x_hat, mask=None)                  signal-to-quantisation-noise ratio in dB
    round_to_bits(x, bits, mode)                  keep ``bits`` mantissa bits (the limited accumulator)

Formats (OCP FP8, as ``torch.float8_e4m3fn`` and ``torch.float8_e5m2``)::

    E4M3: 1 sign, 4 exponent bits (bias 7),  3 mantissa bits, max 448,   min normal 2^-6,  min subnormal 2^-9,  no inf
    E5M2: 1 sign, 5 exponent bits (bias 15), 2 mantissa bits, max 57344, min normal 2^-14, min subnormal 2^-16, +-inf
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FP8Format", "E4M3", "E5M2", "FORMATS", "get_format", "decode", "TILE", "AMAX_FLOOR", "N_C", "sqnr_db", "round_to_bits"]

TILE = 128  # 1x128 activation tiles, 128x128 weight blocks
AMAX_FLOOR = 1e-4  # DeepSeek's inference kernel floors amax so an all-zero block gets a finite scale
N_C = 128  # promotion interval of partial sums to FP32 (DeepSeek-V3 section 3.3.2)


@dataclass(frozen=True)
class FP8Format:
    """An 8-bit floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float  # largest finite magnitude
    has_inf: bool
    torch_dtype: torch.dtype

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest binade (shared by the subnormals): ``1 - bias``."""
        return 1 - self.bias

    @property
    def nan_code(self) -> int:
        """The (positive) NaN code torch writes: all exponent and mantissa bits set, 0x7F."""
        return 0x7F

    @property
    def inf_code(self) -> int | None:
        """+inf: all-ones exponent, zero mantissa (E5M2 only)."""
        return ((1 << self.exp_bits) - 1) << self.man_bits if self.has_inf else None

    def __str__(self) -> str:
        return self.name


E4M3 = FP8Format("e4m3", exp_bits=4, man_bits=3, bias=7, max=448.0, has_inf=False, torch_dtype=torch.float8_e4m3fn)
E5M2 = FP8Format("e5m2", exp_bits=5, man_bits=2, bias=15, max=57344.0, has_inf=True, torch_dtype=torch.float8_e5m2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def get_format(fmt: FP8Format | str) -> FP8Format:
    if isinstance(fmt, FP8Format):
        return fmt
    try:
        return FORMATS[str(fmt).lower()]
    except KeyError:
        raise ValueError(f"unknown FP8 format {fmt!r}: expected one of {sorted(FORMATS)}") from None


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB (over ``mask``)."""
    x = x.detach().to(torch.float64)
    err = x - x_hat.detach().to(torch.float64)
    if mask is not None:
        x, err = x[mask], err[mask]
    noise = float(err.pow(2).sum())
    signal = float(x.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def round_to_bits(x: torch.Tensor, mantissa_bits: int, mode: str = "nearest") -> torch.Tensor:
    """Keep ``mantissa_bits`` bits after the leading one (a float with that many mantissa bits, no range limit).

    ``mode``: "nearest" (ties to even) or "truncate" (toward zero, what an adder that drops the bits
    shifted out during alignment does).
    """
    if mode not in ("nearest", "truncate"):
        raise ValueError(f"mode must be 'nearest' or 'truncate', got {mode!r}")
    if mode == "truncate" and x.dtype == torch.float32 and mantissa_bits < 23:
        drop = 23 - mantissa_bits  # float32 has 23 stored mantissa bits: clear the lowest ones
        return (x.view(torch.int32) & ~((1 << drop) - 1)).view(torch.float32)
    f, e = torch.frexp(x)  # x = f * 2^e, |f| in [0.5, 1)
    scaled = torch.ldexp(f, torch.full_like(f, float(mantissa_bits + 1)))
    kept = torch.round(scaled) if mode == "nearest" else torch.trunc(scaled)
    return torch.ldexp(kept, (e - (mantissa_bits + 1)).to(x.dtype))


def decode(codes: torch.Tensor, fmt: FP8Format | str = E4M3) -> torch.Tensor:
    """Float32 values of 8-bit codes (any integer dtype; only the low 8 bits are used).

    Normal codes (exponent field e > 0) decode to ``2^(e-bias) (1 + m/2^M)``, subnormals (e == 0) to
    ``2^(1-bias) m/2^M``; E4M3's S.1111.111 is NaN, E5M2's all-ones exponent is inf (m == 0) or NaN.
    """
    fmt = get_format(fmt)
    c = codes.to(torch.int64) & 0xFF
    sign = (c >> 7).bool()
    e = (c >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    m = (c & ((1 << fmt.man_bits) - 1)).to(torch.float64)
    frac = m / 2**fmt.man_bits
    normal = torch.ldexp(1.0 + frac, (e - fmt.bias).to(torch.float64))
    subnormal = torch.ldexp(frac, torch.full_like(frac, float(fmt.min_exp)))
    mag = torch.where(e > 0, normal, subnormal)
    e_max = (1 << fmt.exp_bits) - 1
    if fmt.has_inf:
        mag = torch.where((e == e_max) & (m == 0), torch.full_like(mag, math.inf), mag)
        mag = torch.where((e == e_max) & (m != 0), torch.full_like(mag, math.nan), mag)
    else:
        m_max = (1 << fmt.man_bits) - 1
        mag = torch.where((e == e_max) & (m == m_max), torch.full_like(mag, math.nan), mag)
    return torch.where(sign, -mag, mag).to(torch.float32)
