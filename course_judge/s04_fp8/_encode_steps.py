"""Oracles of Section 4's encoder steps (binade, rounding, fields), with the variants known mistakes produce."""

from __future__ import annotations

import torch

from course_lib.deepseek.fp8_formats import E4M3, E5M2, FP8Format

FORMAT_NAMES = {E4M3: "E4M3", E5M2: "E5M2"}


def binade(a: torch.Tensor, f: FP8Format, *, minus_one: bool = True, floor_exp: int | None = None, zero: bool = True,
           extra_bits: int = 0, bias: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, spacing) of magnitudes ``a``; the keyword arguments plant one mistake each (defaults: correct)."""
    a = a.to(torch.float64)
    _, ex = torch.frexp(a)
    e = ex.to(torch.int64) - (1 if minus_one else 0)
    lowest = 1 - (f.bias if bias is None else bias)
    if floor_exp is not False:
        e = e.clamp(min=lowest if floor_exp is None else floor_exp)
    if zero:
        e = torch.where(a == 0, torch.full_like(e, lowest), e)
    return e, torch.exp2((e - f.man_bits - extra_bits).to(torch.float64))


def round_mag(a: torch.Tensor, f: FP8Format, *, mode: str = "even", f32: bool = False) -> torch.Tensor:
    """``a`` rounded to its binade's ticks: ``mode`` "even" (correct), "half_up", "trunc" or "ceil"."""
    _, sp = binade(a, f)
    r = a.to(torch.float64) / sp
    if f32:
        r = r.to(torch.float32).to(torch.float64)
    r = {"even": torch.round, "half_up": lambda v: torch.floor(v + 0.5), "trunc": torch.floor, "ceil": torch.ceil}[mode](r)
    return r * sp


def fields(q: torch.Tensor, f: FP8Format, *, sub_as_normal: bool = False, keep_one: bool = False,
           bias_sign: int = 1, sub_unit: float | None = None, binade_fmt: FP8Format | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent field, mantissa) of representable magnitudes ``q``; keyword arguments plant one mistake each."""
    q = q.to(torch.float64)
    e, _ = binade(q, binade_fmt or f)
    normal = torch.ones_like(q, dtype=torch.bool) if sub_as_normal else q >= f.min_normal
    exp_field = torch.where(normal, e + bias_sign * f.bias, torch.zeros_like(e))
    frac = q / torch.exp2(e.to(torch.float64)) - (0.0 if keep_one else 1.0)
    mant = torch.where(normal, frac * 2**f.man_bits, q / (f.min_subnormal if sub_unit is None else sub_unit))
    return exp_field, mant.round().to(torch.int64)


def representable(f: FP8Format) -> torch.Tensor:
    """Every finite non-negative value of ``f`` (float64, ascending, one per code 0x00..)."""
    v = torch.arange(128).to(torch.uint8).view(f.torch_dtype).to(torch.float64)
    return v[torch.isfinite(v)]
