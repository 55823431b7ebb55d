"""Exercise 4.1, encoding step 1: fp8_binade, the binade of a magnitude and the tick spacing there."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8 import _encode_steps as S
from course_judge.s04_fp8._common import batch, close
from course_lib.deepseek.fp8_formats import E4M3, E5M2

GRADE_ID = "test_04_1_binade"
POINTS = 1.5
ANSWERS = ("ex_04_1_binade",)
SUMMARY = ("every binade of E4M3 and E5M2 with its powers of two and the values just below them, subnormals and 0 in the "
           "lowest binade, the spacing, shapes and dtypes")
REFERENCE = ("course_lib.deepseek.fp8",)


def _mistakes(a, f):
    other = E5M2 if f is E4M3 else E4M3
    return {
        "frexp's exponent is one more than floor(log2 a): a = frac x 2^exp with frac in [0.5, 1)": S.binade(a, f, minus_one=False),
        "0 belongs to the lowest binade 1 - bias too (frexp(0) returns exponent 0)": S.binade(a, f, zero=False),
        "the subnormals share the lowest binade: e never goes below 1 - bias": S.binade(a, f, floor_exp=False),
        "the lowest binade is 1 - bias, not -bias (the exponent field 0 counts as 1)": S.binade(a, f, floor_exp=-f.bias),
        f"the bias of {S.FORMAT_NAMES[f]} is {f.bias}: use the format's own fields (fmt.bias, fmt.man_bits), "
        f"not {S.FORMAT_NAMES[other]}'s": S.binade(a, f, bias=other.bias),
    }


def _spacing_mistakes(a, f):
    return {"the spacing is 2^(e - M), M = fmt.man_bits: 2^M ticks per binade": S.binade(a, f, extra_bits=1)[1],
            "the spacing is 2^(e - M), M = fmt.man_bits (not one bit fewer)": S.binade(a, f, extra_bits=-1)[1]}


def _inputs(f, g):
    v = S.representable(f)
    powers = torch.exp2(torch.arange(f.min_exp - f.man_bits, 17, dtype=torch.float64))
    below = powers * (1 - 2.0**-20)  # just below each power of two: still the binade underneath
    rnd = 10 ** torch.empty(2000, dtype=torch.float64).uniform_(-7, 5.5, generator=g)
    return torch.cat([v, powers, below, rnd, torch.tensor([0.0, 1e-30], dtype=torch.float64)])


def _check(r, a, f, what):
    e, sp = expect_tuple(r, 2, what)
    e = expect_tensor(e, f"{what}: e", shape=tuple(a.shape))
    sp = expect_tensor(sp, f"{what}: spacing", shape=tuple(a.shape))
    assert_true(e.dtype == torch.int64, f"{what}: the binade e should be int64, got {e.dtype}")
    assert_true(sp.dtype == torch.float64, f"{what}: the spacing should be float64, got {sp.dtype}")
    want_e, want_sp = S.binade(a, f)
    close(e, want_e, atol=0, name=f"{what}: binades", mistakes={k: v[0] for k, v in _mistakes(a, f).items()},
          hint="floor(log2 a), never below 1 - bias")
    close(sp, want_sp, atol=0, name=f"{what}: spacings", mistakes=_spacing_mistakes(a, f), hint="2^(e - M)")


def judge(k, t):
    fmt = {f: k.lib(f"course_lib.deepseek.fp8_formats:{S.FORMAT_NAMES[f]}") for f in (E4M3, E5M2)}
    fn = k.g.fp8_binade
    with t.part("visible checks: five E4M3 magnitudes (1, 1.3, 448, 2^-9, 0)", 0.75):
        a = torch.tensor([1.0, 1.3, 448.0, 2.0**-9, 0.0], dtype=torch.float64)
        _check(fn(a, fmt[E4M3]), a, E4M3, "fp8_binade([1, 1.3, 448, 2^-9, 0], E4M3)")
    g = torch.Generator().manual_seed(7)
    with t.part("every value of E4M3 and E5M2, powers of two and the values just below them, subnormals, 0, "
                "random magnitudes, a (3, 4) shape", 0.75):
        ins = {f: _inputs(f, g) for f in (E4M3, E5M2)}
        grid = torch.rand(3, 4, generator=g, dtype=torch.float64) * 100
        res = batch(k, [(fn, (ins[f], fmt[f]), {}) for f in (E4M3, E5M2)] + [(fn, (grid, fmt[E4M3]), {})])
        for f, r in zip((E4M3, E5M2), res):
            _check(r, ins[f], f, f"fp8_binade of {ins[f].numel()} {S.FORMAT_NAMES[f]} magnitudes")
        _check(res[2], grid, E4M3, "fp8_binade of a (3, 4) tensor")


MUTANTS = [
    Mutant("frexp exponent not lowered", "e = (exp.to(torch.int64) - 1).clamp", "e = (exp.to(torch.int64)).clamp",
           expect="one more than floor(log2 a)"),
    Mutant("0 left where frexp puts it", "    e = torch.where(a == 0, 1 - fmt.bias, e)  # frexp(0) = (0, 0): 0 belongs there too\n", "",
           expect="0 belongs to the lowest binade"),
    Mutant("no floor for subnormals", "e = (exp.to(torch.int64) - 1).clamp(min=1 - fmt.bias)", "e = exp.to(torch.int64) - 1",
           expect="subnormals share the lowest binade"),
    Mutant("floor at -bias", "e = (exp.to(torch.int64) - 1).clamp(min=1 - fmt.bias)", "e = (exp.to(torch.int64) - 1).clamp(min=-fmt.bias)",
           expect="not -bias"),
    Mutant("E4M3's bias hard-coded", "1 - fmt.bias", "1 - 7", count=3, expect="use the format's own fields"),
    Mutant("spacing one bit too fine", "torch.exp2((e - fmt.man_bits).to(torch.float64))",
           "torch.exp2((e - fmt.man_bits - 1).to(torch.float64))", expect="2^M ticks per binade"),
]

ALTERNATIVES = [
    Alternative("floor(log2 a) where a > 0", source='''
def fp8_binade(a, fmt):
    ### BEGIN SOLUTION
    lowest = 1 - fmt.bias
    safe = torch.where(a > 0, a, torch.ones_like(a))
    e = torch.floor(torch.log2(safe)).to(torch.int64)
    e = torch.where(a > 0, e.clamp(min=lowest), torch.full_like(e, lowest))
    return e, 2.0 ** (e - fmt.man_bits).to(torch.float64)
    ### END SOLUTION
'''),
]
