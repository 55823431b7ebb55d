"""Exercise 4.1, encoding step 3: fp8_fields, the exponent and mantissa fields of a representable magnitude."""

from __future__ import annotations

import torch

from course_judge.checks import assert_true, expect_tensor, expect_tuple
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8 import _encode_steps as S
from course_judge.s04_fp8._common import batch, close
from course_lib.deepseek.fp8_formats import E4M3, E5M2

GRADE_ID = "test_04_1_fields"
POINTS = 1.5
ANSWERS = ("ex_04_1_fields",)
SUMMARY = "the fields of every finite positive value of E4M3 and E5M2 against its code, 0, subnormals, the top binade, shapes and int64"
REFERENCE = ("course_lib.deepseek.fp8",)


def _mistakes(q, f):
    other = E5M2 if f is E4M3 else E4M3
    return {
        "subnormals (exponent field 0) have no leading 1: exponent field 0 and q counted in smallest subnormals":
            S.fields(q, f, sub_as_normal=True),
        "the mantissa field holds the bits AFTER the leading 1: subtract it before scaling by 2^M": S.fields(q, f, keep_one=True),
        "the exponent field is binade + bias (the decoder subtracts the bias)": S.fields(q, f, bias_sign=-1),
        "a subnormal's mantissa counts smallest subnormals 2^(1-bias-M), not smallest normals": S.fields(q, f, sub_unit=f.min_normal),
        f"the binade was taken in {S.FORMAT_NAMES[other]}: use the format you were given": S.fields(q, f, binade_fmt=other),
    }


def _check(r, q, f, what):
    ef, mf = expect_tuple(r, 2, what)
    ef = expect_tensor(ef, f"{what}: exponent fields", shape=tuple(q.shape))
    mf = expect_tensor(mf, f"{what}: mantissas", shape=tuple(q.shape))
    assert_true(ef.dtype == torch.int64 and mf.dtype == torch.int64, f"{what}: both fields should be int64, got {ef.dtype}, {mf.dtype}")
    want_e, want_m = S.fields(q, f)
    ms = _mistakes(q, f)
    close(ef, want_e, atol=0, name=f"{what}: exponent fields", mistakes={k: v[0] for k, v in ms.items() if not torch.equal(v[0], want_e)},
          hint="binade + bias for normal values, 0 for subnormals and 0")
    close(mf, want_m, atol=0, name=f"{what}: mantissas", mistakes={k: v[1] for k, v in ms.items()},
          hint="normal: the M bits after the leading 1; subnormal: q / smallest subnormal")


def _codes_fields(f):
    """Every finite non-negative value of f and, from its own code, the fields a correct answer returns."""
    codes = torch.arange(128, dtype=torch.int64)
    v = codes.to(torch.uint8).view(f.torch_dtype).to(torch.float64)
    keep = torch.isfinite(v)
    c = codes[keep]
    return v[keep], (c >> f.man_bits) & ((1 << f.exp_bits) - 1), c & ((1 << f.man_bits) - 1)


def judge(k, t):
    fmt = {f: k.lib(f"course_lib.deepseek.fp8_formats:{S.FORMAT_NAMES[f]}") for f in (E4M3, E5M2)}
    fn = k.g.fp8_fields
    with t.part("visible checks: 1.25, 2, 448, 2^-9, 2^-6 and 0 (E4M3)", 0.75):
        q = torch.tensor([1.25, 2.0, 448.0, 2.0**-9, 2.0**-6, 0.0], dtype=torch.float64)
        _check(fn(q, fmt[E4M3]), q, E4M3, "fp8_fields([1.25, 2, 448, 2^-9, 2^-6, 0], E4M3)")
    with t.part("the fields of every finite non-negative value of E4M3 and E5M2 against its own code, a (4, 8) shape", 0.75):
        data = {f: _codes_fields(f) for f in (E4M3, E5M2)}
        grid = data[E4M3][0][:32].reshape(4, 8)
        res = batch(k, [(fn, (data[f][0], fmt[f]), {}) for f in (E4M3, E5M2)] + [(fn, (grid, fmt[E4M3]), {})])
        for f, r in zip((E4M3, E5M2), res):
            q, want_e, want_m = data[f]
            _check(r, q, f, f"fp8_fields of the {q.numel()} finite non-negative {S.FORMAT_NAMES[f]} values")
            ef, mf = r
            assert_true(torch.equal(ef, want_e) and torch.equal(mf, want_m),
                        f"{S.FORMAT_NAMES[f]}: the fields disagree with the values' own codes")
        _check(res[2], grid, E4M3, "fp8_fields of a (4, 8) tensor")


MUTANTS = [
    Mutant("subnormals treated as normal", "normal = q >= fmt.min_normal", "normal = q >= 0", expect="have no leading 1"),
    Mutant("leading 1 kept in the mantissa", "(q / torch.exp2(e.to(torch.float64)) - 1.0) * 2**fmt.man_bits",
           "(q / torch.exp2(e.to(torch.float64))) * 2**fmt.man_bits", expect="bits AFTER the leading 1"),
    Mutant("bias subtracted", "exp_field = torch.where(normal, e + fmt.bias,",
           "exp_field = torch.where(normal, e - fmt.bias,", expect="binade + bias"),
    Mutant("subnormals counted in smallest normals", "q / fmt.min_subnormal)", "q / fmt.min_normal)",
           expect="not smallest normals"),
    Mutant("E4M3's fields for every format", "e, _ = fp8_binade(q, fmt)", "e, _ = fp8_binade(q, E4M3)",
           expect="use the format you were given"),
]

ALTERNATIVES = [
    Alternative("ldexp and integer arithmetic", source='''
def fp8_fields(q, fmt):
    ### BEGIN SOLUTION
    _, exp = torch.frexp(q)
    e = (exp.to(torch.int64) - 1).clamp(min=1 - fmt.bias)
    units = torch.ldexp(q, (fmt.man_bits - e).to(torch.float64)).to(torch.int64)  # q in ticks of its binade
    normal = units >= 2**fmt.man_bits
    exp_field = torch.where(normal, e + fmt.bias, torch.zeros_like(e))
    mant = torch.where(normal, units - 2**fmt.man_bits, units)
    return exp_field, mant
    ### END SOLUTION
'''),
]
