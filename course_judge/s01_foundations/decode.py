"""Exercise 1.4: decoding FP8 bit patterns by hand; the formats' limits."""

from __future__ import annotations

import math

import torch

from course_judge.checks import assert_true, expect_float, expect_tuple
from course_judge.local import Alternative, Mutant

GRADE_ID = "test_01_4_decode"
POINTS = 3.5
ANSWERS = ("ex_01_4_decode",)
SUMMARY = "all 256 codes of E4M3 and E5M2 against torch's float8 dtypes, NaN/inf rules, subnormals, max / min normal / min subnormal"
REFERENCE = ("course_lib.deepseek.fp8", "course_lib.deepseek.fp8_formats")

_LAYOUT = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}
_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _torch_values(fmt: str) -> list[float]:
    return torch.arange(256, dtype=torch.int64).to(torch.uint8).view(_DTYPES[fmt]).to(torch.float64).tolist()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _hint(fmt: str, code: int, got: float) -> str:
    E, M, bias = _LAYOUT[fmt]
    e, m = (code >> M) & ((1 << E) - 1), code & ((1 << M) - 1)
    sign = -1.0 if code >> 7 else 1.0
    if e == 0:
        if _same(got, sign * 2.0 ** (-bias) * (1 + m / 2**M)) or _same(got, sign * 2.0 ** (1 - bias) * (1 + m / 2**M)):
            return "exponent 0 is subnormal: 2^(1-bias) x m/2^M, with no implicit leading 1"
        if _same(got, sign * 2.0 ** (-bias) * (m / 2**M)):
            return "subnormals use the exponent 1 - bias, not 0 - bias"
    if e != 0 and _same(got, sign * 2.0 ** (e - (1 << (E - 1))) * (1 + m / 2**M)):
        return f"the bias of {fmt.upper()} is {bias} (2^(E-1) - 1), not 2^(E-1)"
    if e != 0 and _same(got, sign * 2.0 ** (e - bias) * (m / 2**M)):
        return "normal numbers carry an implicit leading 1: (1 + m/2^M)"
    if fmt == "e4m3" and e == (1 << E) - 1:
        return "E4M3 (fn) has no infinity: exponent 1111 holds normal numbers except mantissa 111 (NaN)"
    if fmt == "e5m2" and e == (1 << E) - 1:
        return "E5M2: exponent 11111 with mantissa 0 is inf, otherwise NaN"
    if _same(got, -sign * abs(got)) and got != 0:
        return "the sign bit is the most significant bit (bit 7)"
    return "value = (-1)^s x 2^(e - bias) x (1 + m/2^M) for e != 0"


def judge(k, t):
    dec, limits = k.g.decode_fp8, k.g.fp8_limits
    with t.part("visible checks: 1.0, -3.0, the smallest E4M3 subnormal, an E5M2 one, E4M3's max", 1):
        for code, fmt, want in ((0b0_0111_000, "e4m3", 1.0), (0b1_1000_100, "e4m3", -3.0), (0b0_0000_001, "e4m3", 2.0**-9),
                                (0b0_01111_00, "e5m2", 1.0)):
            got = expect_float(dec(code, fmt), f"decode_fp8({code:#010b}, {fmt!r})")
            assert_true(_same(got, want), f"decode_fp8({code:#010b}, {fmt!r}) = {got}, expected {want}", hint=_hint(fmt, code, got))
        mx = expect_float(expect_tuple(limits("e4m3"), 3, "fp8_limits('e4m3')")[0], "fp8_limits('e4m3')[0]")
        assert_true(mx == 448.0, f"E4M3's largest finite value: got {mx}, expected 448.0",
                    hint="E4M3 (fn) keeps exponent 1111 for numbers: 2^8 x 1.75 = 448")
    for fmt, pts in (("e4m3", 1), ("e5m2", 1)):
        with t.part(f"all 256 {fmt.upper()} codes against torch.{_DTYPES[fmt]}", pts):
            want = _torch_values(fmt)
            got = k.many([(dec, (c, fmt), {}) for c in range(256)])
            for c in range(256):
                if isinstance(got[c], Exception):
                    raise got[c]
                v = expect_float(got[c], f"decode_fp8({c:#010b}, {fmt!r})")
                assert_true(_same(v, want[c]), f"{fmt} code {c:#010b}: decoded {v}, torch says {want[c]}", hint=_hint(fmt, c, v))
    with t.part("fp8_limits: max, min normal, min subnormal of both formats", 0.5):
        for fmt in ("e4m3", "e5m2"):
            fi = torch.finfo(_DTYPES[fmt])
            mx, mn, sub = (expect_float(x, f"fp8_limits({fmt!r})") for x in expect_tuple(limits(fmt), 3, f"fp8_limits({fmt!r})"))
            assert_true(mx == fi.max, f"{fmt} max: got {mx}, expected {fi.max}", hint="the largest finite value (NaN/inf codes excluded)")
            assert_true(mn == fi.smallest_normal, f"{fmt} min normal: got {mn}, expected {fi.smallest_normal}",
                        hint="the smallest normal number is 2^(1 - bias) (exponent field 1, mantissa 0)")
            assert_true(sub == fi.smallest_normal * fi.eps, f"{fmt} min subnormal: got {sub}, expected {fi.smallest_normal * fi.eps}",
                        hint="the smallest subnormal is 2^(1 - bias - M)")


MUTANTS = [
    Mutant("subnormals with the implicit 1", "return sign * 2.0 ** (1 - bias) * (m / 2**M)",
           "return sign * 2.0 ** (1 - bias) * (1 + m / 2**M)",
           expect="no implicit leading 1"),
    Mutant("subnormal exponent -bias", "return sign * 2.0 ** (1 - bias) * (m / 2**M)", "return sign * 2.0 ** (-bias) * (m / 2**M)",
           expect="1 - bias, not 0 - bias"),
    Mutant("bias 2^(E-1)", '"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)', '"e4m3": (4, 3, 8), "e5m2": (5, 2, 16)', expect="the bias of"),
    Mutant("E4M3 treated as IEEE", 'if fmt == "e5m2" and e == e_max:', 'if e == e_max and not (fmt == "e4m3" and m == 7):',
           expect="no infinity"),
    Mutant("E5M2 inf as NaN", "return sign * float(\"inf\") if m == 0 else float(\"nan\")", "return float(\"nan\")", expect="inf"),
    Mutant("no implicit 1 for normals", "return sign * 2.0 ** (e - bias) * (1 + m / 2**M)", "return sign * 2.0 ** (e - bias) * (m / 2**M)",
           expect="implicit leading 1"),
    Mutant("min normal 2^-bias", "return max(finite), 2.0 ** (1 - bias), 2.0 ** (1 - bias - M)",
           "return max(finite), 2.0 ** (-bias), 2.0 ** (1 - bias - M)", expect="min normal"),
    Mutant("sign ignored", "sign = -1.0 if code >> 7 else 1.0", "sign = 1.0", expect="sign bit"),
]

ALTERNATIVES = [
    Alternative("bit strings and a table", source='''
FP8_FORMATS = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}


def decode_fp8(code, fmt="e4m3"):
    if not 0 <= code <= 255:
        raise ValueError(code)
    E, M, bias = FP8_FORMATS[fmt]
    bits = format(code, "08b")
    s, e, m = int(bits[0]), int(bits[1:1 + E], 2), int(bits[1 + E:], 2)
    if fmt == "e5m2" and e == 2**E - 1:
        return (-1) ** s * math.inf if m == 0 else math.nan
    if fmt == "e4m3" and e == 2**E - 1 and m == 2**M - 1:
        return math.nan
    frac = m / 2**M if e == 0 else 1 + m / 2**M
    return (-1) ** s * math.ldexp(frac, max(e, 1) - bias)


def fp8_limits(fmt="e4m3"):
    E, M, bias = FP8_FORMATS[fmt]
    finite = [decode_fp8(c, fmt) for c in range(128)]
    top = max(v for v in finite if math.isfinite(v))
    return top, decode_fp8(1 << M, fmt), decode_fp8(1, fmt)
'''),
]
