"""Exercise 4.1, encoding step 2: fp8_round, a magnitude rounded to the nearest tick of its binade, ties to even."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8 import _encode_steps as S
from course_judge.s04_fp8._common import batch, close
from course_lib.deepseek.fp8_formats import E4M3, E5M2

GRADE_ID = "test_04_1_round"
POINTS = 1.5
ANSWERS = ("ex_04_1_round",)
SUMMARY = ("every midpoint of E4M3 and E5M2 (half to even), float64 values a hair either side of each midpoint, dense random "
           "values, subnormals, values above max, the carry into the next binade")
REFERENCE = ("course_lib.deepseek.fp8",)


def _mistakes(a, f):
    other = E5M2 if f is E4M3 else E4M3
    return {
        "ties go to the even tick: torch.round (half to even) on a / spacing, not floor(a / spacing + 0.5)":
            S.round_mag(a, f, mode="half_up"),
        "values are truncated toward zero: round to the NEAREST tick": S.round_mag(a, f, mode="trunc"),
        "values are rounded up: round to the NEAREST tick": S.round_mag(a, f, mode="ceil"),
        "a / spacing went through float32, which rounds a value a hair off a tie onto the tie: stay in float64":
            S.round_mag(a, f, f32=True),
        f"rounded on {S.FORMAT_NAMES[other]}'s ticks: pass the format you were given to fp8_binade": S.round_mag(a, other),
    }


def _inputs(f, g):
    v = S.representable(f)
    mid = (v[:-1] + v[1:]) / 2
    top = v[-1] + (v[-1] - v[-2]) * torch.tensor([0.5, 0.75, 1.5], dtype=torch.float64)  # above max: no clamping here
    rnd = 10 ** torch.empty(3000, dtype=torch.float64).uniform_(-7, 5.5, generator=g)
    return torch.cat([v, mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), top, rnd])


def _check(r, a, f, what):
    got = expect_tensor(r, what, shape=tuple(a.shape))
    assert_true(got.dtype == torch.float64, f"{what} should be float64, got {got.dtype}")
    close(got, S.round_mag(a, f), atol=0, name=what, mistakes=_mistakes(a, f),
          hint="round a / spacing to the nearest integer (ties to even) and multiply back")


def judge(k, t):
    fmt = {f: k.lib(f"course_lib.deepseek.fp8_formats:{S.FORMAT_NAMES[f]}") for f in (E4M3, E5M2)}
    fn = k.g.fp8_round
    with t.part("visible checks: 1.3, two ties, the carry of 1.97, 470 above max, a subnormal tie (E4M3)", 0.75):
        a = torch.tensor([1.3, 1 + 1 / 16, 1 + 3 / 16, 1.97, 470.0, 3 * 2.0**-10], dtype=torch.float64)
        _check(fn(a, fmt[E4M3]), a, E4M3, "fp8_round([1.3, 1+1/16, 1+3/16, 1.97, 470, 3x2^-10], E4M3)")
    g = torch.Generator().manual_seed(11)
    with t.part("every value and midpoint of E4M3 and E5M2, a hair either side of each midpoint, above max, random "
                "magnitudes, a (2, 5) shape", 0.75):
        ins = {f: _inputs(f, g) for f in (E4M3, E5M2)}
        grid = torch.rand(2, 5, generator=g, dtype=torch.float64) * 10
        res = batch(k, [(fn, (ins[f], fmt[f]), {}) for f in (E4M3, E5M2)] + [(fn, (grid, fmt[E5M2]), {})])
        for f, r in zip((E4M3, E5M2), res):
            _check(r, ins[f], f, f"fp8_round of {ins[f].numel()} {S.FORMAT_NAMES[f]} magnitudes")
        _check(res[2], grid, E5M2, "fp8_round of a (2, 5) tensor")


MUTANTS = [
    Mutant("round half up", "return torch.round(a / spacing) * spacing", "return torch.floor(a / spacing + 0.5) * spacing",
           expect="ties go to the even tick"),
    Mutant("truncation", "return torch.round(a / spacing) * spacing", "return torch.floor(a / spacing) * spacing",
           expect="truncated toward zero"),
    Mutant("rounding up", "return torch.round(a / spacing) * spacing", "return torch.ceil(a / spacing) * spacing",
           expect="rounded up"),
    Mutant("a float32 detour", "return torch.round(a / spacing) * spacing",
           "return torch.round((a / spacing).float()).double() * spacing", expect="went through float32"),
    Mutant("E4M3's ticks for every format", "_, spacing = fp8_binade(a, fmt)", "_, spacing = fp8_binade(a, E4M3)",
           expect="pass the format you were given"),
]

ALTERNATIVES = [
    Alternative("the integer and fractional parts, ties decided by hand", source='''
def fp8_round(a, fmt):
    ### BEGIN SOLUTION
    _, spacing = fp8_binade(a, fmt)
    r = a / spacing
    lo = torch.floor(r)
    frac = r - lo
    up = (frac > 0.5) | ((frac == 0.5) & (torch.remainder(lo, 2) == 1))
    return (lo + up.to(lo.dtype)) * spacing
    ### END SOLUTION
'''),
]
