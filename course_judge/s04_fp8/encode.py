"""Exercise 4.1, encoding step 4: FP8Converter.encode at the bit level (the sign, saturation, overflow, NaN), against torch."""

from __future__ import annotations

import math
from functools import partial

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8._common import BIT_LEVEL_FORBIDDEN, batch, bytecode_names, close, hexes
from course_lib.deepseek import fp8 as ref
from course_lib.deepseek.fp8_formats import E4M3, E5M2, FP8Format

GRADE_ID = "test_04_1_encode"
POINTS = 3
ANSWERS = ("ex_04_1_converter",)
SUMMARY = ("every tie (half to even), dense random values, -0.0 and every code's round trip against torch's clamped cast, "
           "x read exactly in float64, overflow with and without saturation (E5M2 inf, E4M3 NaN), infinities, NaN codes, "
           "shapes, no float8 casts")
REFERENCE = ("course_lib.deepseek.fp8",)

_CODES = torch.arange(256).to(torch.uint8)


# ----------------------------------------------------------------------------- encode: oracle variants


def _encode_variant(x: torch.Tensor, f: FP8Format, *, saturate=True, rounding="even", signbit=True, f32=False, sat_max=None,
                    carry=True, nan=True) -> torch.Tensor:
    """The codes an encoder with one known mistake produces (int64); the defaults are the correct encoder."""
    x = x.detach().to(torch.float32 if f32 else torch.float64).to(torch.float64)
    sign = (torch.signbit(x) if signbit else (x < 0)).to(torch.int64)
    a = x.abs()
    if saturate:
        a = a.clamp(max=f.max if sat_max is None else sat_max)
    _, ex = torch.frexp(a)
    e = (ex.to(torch.int64) - 1).clamp(min=1 - f.bias)
    step = torch.exp2((e - f.man_bits).to(torch.float64))
    r = a / step
    r = {"even": torch.round(r), "half_up": torch.floor(r + 0.5), "trunc": torch.floor(r)}[rounding]
    q = r * step
    ok = q <= f.max
    if sat_max is not None:
        ok = torch.isfinite(q)
    q = torch.where(ok, q, torch.zeros_like(q))
    if carry:
        _, eq = torch.frexp(q)
        e_q = eq.to(torch.int64) - 1
    else:  # exponent of the value before rounding: a mantissa that rounds up to 2^M spills into the exponent bits
        e_q = e
    normal = (q >= f.min_normal) if carry else (a >= f.min_normal)
    exp_field = torch.where(normal, e_q + f.bias, torch.zeros_like(e_q))
    mant = torch.where(normal, (q / torch.exp2(e_q.to(torch.float64)) - 1.0) * 2**f.man_bits, q / f.min_subnormal)
    code = (sign << 7) | ((exp_field.clamp(min=0) << f.man_bits) | mant.round().to(torch.int64)) & 0x7F
    e_ones = (1 << f.exp_bits) - 1
    code = torch.where(ok, code, (sign << 7) | ((e_ones << f.man_bits) if f.has_inf else 0x7F))
    if nan:
        code = torch.where(torch.isnan(x), (sign << 7) | 0x7F, code)
    return code


def _encode_mistakes(x: torch.Tensor, f: FP8Format) -> dict[str, torch.Tensor]:
    top = 2.0 ** (f.bias + 1) * (2 - 2.0**-f.man_bits)  # the largest magnitude of the IEEE-style layout
    out = {
        "ties go to the even mantissa: use torch.round (half to even) on x / spacing, not floor(x / spacing + 0.5)":
            _encode_variant(x, f, rounding="half_up"),
        "values are truncated toward zero: round to the NEAREST tick (ties to the even mantissa)": _encode_variant(x, f, rounding="trunc"),
        "saturate=True must clamp to +-max before rounding: out-of-range values (and inf) become +-max, not inf/NaN":
            _encode_variant(x, f, saturate=False),
        "the sign of -0.0 is lost: take the sign bit with torch.signbit (x < 0 is False for -0.0)": _encode_variant(x, f, signbit=False),
        "a value that rounds up to the next power of two must carry into the exponent (e.g. 1.9375 -> 2.0 in E4M3)":
            _encode_variant(x, f, carry=False),
    }
    if f is E4M3:
        out[f"the clamp uses {top:g}, the top of the IEEE-style layout: E4M3's largest finite value is {f.max:g}"] = \
            _encode_variant(x, f, sat_max=top)
    return out


def _values(f: FP8Format) -> torch.Tensor:
    return _CODES.view(f.torch_dtype).to(torch.float64)


def _ties_and_random(f: FP8Format, g: torch.Generator) -> torch.Tensor:
    grid = _values(f)
    grid = grid[torch.isfinite(grid)].unique()
    mid = (grid[:-1] + grid[1:]) / 2
    x = torch.randn(60000, generator=g).sign() * 10 ** torch.empty(60000).uniform_(-7, 6, generator=g)
    return torch.cat([x, mid.float(), grid.float(), torch.tensor([0.0, -0.0, 1e9, -1e9])])


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.isnan(a) & torch.isnan(b)) | ((a == b) & (torch.signbit(a) == torch.signbit(b)))


def judge(k, t):
    conv = k.g.FP8Converter("e4m3")
    with t.part("visible checks: six E4M3 codes, -0.0, saturation, overflow without saturation, NaN", 0.75):
        x6 = torch.tensor([1.0, -2.0, 448.0, 0.0, 2.0**-9, -1.3])
        r_enc, r_neg0, r_sat, r_over, r_nan = batch(k, [
            (conv.encode, (x6,), {}), (conv.encode, (torch.tensor([-0.0]),), {}), (conv.encode, (torch.tensor([1000.0]),), {}),
            (conv.encode, (torch.tensor([1000.0]),), {"saturate": False}), (conv.encode, (torch.tensor([math.nan]),), {})])
        got = expect_tensor(r_enc, "encode([1, -2, 448, 0, 2^-9, -1.3])", shape=(6,))
        assert_true(got.dtype == torch.uint8, f"encode should return uint8 codes, got {got.dtype}")
        close(got.to(torch.int64), _encode_variant(x6, E4M3), atol=0, name="E4M3 codes of [1, -2, 448, 0, 2^-9, -1.3]",
              mistakes=_encode_mistakes(x6, E4M3),
              hint="sign in bit 7, exponent field (bias 7) in bits 6-3, mantissa in bits 2-0; 2^-9 is subnormal")
        neg0 = expect_tensor(r_neg0, "encode(-0.0)")
        assert_true(neg0.numel() == 1 and neg0.item() == 0x80, "-0.0 keeps its sign bit: code 0x80",
                    hint="the sign of -0.0 is lost by x < 0: torch.signbit sees it")
        sat = expect_tensor(r_sat, "encode(1000)")
        assert_true(sat.numel() == 1 and sat.item() == 0x7E, "1000 must saturate to 448 (0x7e) when saturate=True",
                    hint="saturate=True clamps to +-max before rounding")
        over = expect_tensor(r_over, "encode(1000, saturate=False)")
        assert_true(over.numel() == 1 and over.item() == 0x7F,
                    "without saturation, 1000 has no E4M3 code: NaN (0x7f), since E4M3 has no infinity")
        nan = expect_tensor(r_nan, "encode(NaN)").to(torch.int64)
        assert_true(bool(torch.isnan(ref.decode(nan, E4M3)).all()), f"NaN must encode to a NaN code, got {hexes(nan)}",
                    hint="check for NaN before rounding (NaN compares false with everything)")

    convs = {f: k.g.FP8Converter(f.name) for f in (E4M3, E5M2)}
    g = torch.Generator().manual_seed(41)
    with t.part("encode: every tie (half to even), dense random values, -0.0 and the round trip, against torch's clamped cast; "
                "x read exactly in float64", 0.75):
        inputs = {}
        for f in convs:
            vals = _values(f)
            grid = vals[torch.isfinite(vals)].unique()
            mid = (grid[:-1] + grid[1:]) / 2
            x64 = torch.cat([mid * (1 + 2.0**-40), mid * (1 - 2.0**-40)]).to(torch.float64)  # a hair off each tie, in float64
            inputs[f] = (_ties_and_random(f, g), vals, x64)
        res = batch(k, [call for f, c in convs.items() for call in ((c.encode, (inputs[f][0],), {}),
                                                                     (c.encode, (inputs[f][1].float(),), {"saturate": False}),
                                                                     (c.encode, (inputs[f][2],), {}))])
        for i, f in enumerate(convs):
            x, vals, x64 = inputs[f]
            r_x, r_back, r_64 = res[3 * i:3 * i + 3]
            want = x.clamp(-f.max, f.max).to(f.torch_dtype).view(torch.uint8).to(torch.int64)
            got = expect_tensor(r_x, f"{f.name} encode(x)", shape=tuple(x.shape))
            assert_true(got.dtype == torch.uint8, f"encode should return uint8 codes, got {got.dtype}")
            got = got.to(torch.int64)
            close(got, want, atol=0, name=f"{f.name}: codes of {x.numel()} values (ties, random, +-0, +-1e9)",
                  mistakes=partial(_encode_mistakes, x, f))
            bad = got != want
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                hint = ("below the smallest normal the tick spacing stays 2^(1-bias-M) (subnormals)" if abs(float(x[i])) < f.min_normal
                        else "round half to even on the tick spacing of the value's binade")
                assert_true(False, f"{f.name}: encode disagrees with torch's (clamped) cast at {x[bad][:5].tolist()}: "
                            f"got {hexes(got[bad][:5])}, torch {hexes(want[bad][:5])}", hint=hint)
            keep = ~torch.isnan(vals)
            back = expect_tensor(r_back, f"{f.name} encode(decoded codes, saturate=False)")
            assert_true(torch.equal(back.to(torch.int64)[keep], _CODES.to(torch.int64)[keep]),
                        f"{f.name}: encode(value of code) != code for codes "
                        f"{hexes(_CODES[keep][back.to(torch.int64)[keep] != _CODES.to(torch.int64)[keep]])[:8]}",
                        hint="every representable value (and -0.0) must encode to its own code")
            # float64 values a hair above / below each tie: one rounding, read exactly in float64
            want64 = ref.encode(x64, f).to(torch.int64)
            got64 = expect_tensor(r_64, f"{f.name} encode(float64 values next to the ties)").to(torch.int64)
            close(got64, want64, atol=0, name=f"{f.name}: codes of float64 values a hair off each tie",
                  mistakes={"x is read through float32 (a float32 detour or torch's float8 cast, which rounds via float32): "
                            "a value a hair above a tie is rounded twice; read x exactly in float64":
                            _encode_variant(x64, f, f32=True)},
                  hint="convert x to float64 first and round once")

    with t.part("overflow without saturation (E5M2 inf, E4M3 NaN), saturation to +-max, NaN codes, shapes; "
                "bit level (no torch float8 casts)", 1.5):
        e5, e4 = convs[E5M2], convs[E4M3]
        r = batch(k, [(e5.encode, (torch.tensor([1e6, -1e6, math.inf]),), {"saturate": False}),
                      (e5.encode, (torch.tensor([1e6, -math.inf]),), {}),
                      (e4.encode, (torch.tensor([500.0, -1e6]),), {"saturate": False}),
                      (e4.encode, (torch.tensor([-math.inf]),), {}),
                      (e4.encode, (torch.tensor([math.nan, -math.nan]),), {}),
                      (e5.encode, (torch.tensor([math.nan, -math.nan]),), {}),
                      (e4.encode, (torch.tensor([[1.0, 2.0], [3.0, 4.0]]),), {})])
        got = expect_tensor(r[0], "E5M2 encode(overflow, saturate=False)")
        assert_true(got.tolist() == [0x7C, 0xFC, 0x7C], f"E5M2 without saturation: overflow and inf encode to +-inf (0x7c / 0xfc), "
                    f"got {hexes(got.tolist())}",
                    hint=("saturate=False must not clamp" if got.tolist()[0] == 0x7B else "E5M2's inf is S.11111.00"))
        got = expect_tensor(r[1], "E5M2 encode(overflow)")
        assert_true(got.tolist() == [0x7B, 0xFB], f"E5M2 with saturation: +-57344 (0x7b / 0xfb), got {hexes(got.tolist())}",
                    hint="saturate=True clamps to +-max before rounding, infinities too")
        got = expect_tensor(r[2], "E4M3 encode(overflow, saturate=False)")
        assert_true(got.tolist() == [0x7F, 0xFF], f"E4M3 has no inf: an overflow without saturation is NaN (0x7f / 0xff), "
                    f"got {hexes(got.tolist())}",
                    hint=("E4M3 has no inf code: S.1111.000 is the normal number 256; an overflow without saturation is NaN"
                          if got.tolist()[0] == 0x78 else "magnitudes that round above 448 have no code: NaN, S.1111.111"))
        got = expect_tensor(r[3], "E4M3 encode(-inf)")
        assert_true(got.tolist() == [0xFE], f"E4M3 saturates -inf to -448 (0xfe), got {hexes(got.tolist())}")
        for f, rn in ((E4M3, r[4]), (E5M2, r[5])):
            nan = expect_tensor(rn, f"{f.name} encode(NaN)").to(torch.int64)
            assert_true(bool(torch.isnan(ref.decode(nan, f)).all()), f"{f.name}: NaN must encode to a NaN code, got {hexes(nan)}",
                        hint="check for NaN before rounding (NaN compares false with everything)")
        got = expect_tensor(r[6], "encode of a (2, 2) tensor")
        assert_true(tuple(got.shape) == (2, 2), f"encode must keep the shape of its input: got {tuple(got.shape)} for (2, 2)")
        for what, fn in (("encode", k.g.FP8Converter.encode), ("fp8_binade", k.g.fp8_binade), ("fp8_round", k.g.fp8_round),
                         ("fp8_fields", k.g.fp8_fields)):
            names = bytecode_names(k, fn)
            used = sorted((names or set()) & BIT_LEVEL_FORBIDDEN)
            assert_true(not used, f"{what} must work at the bit level, without torch's float8 dtypes (it uses {used})",
                        hint="integer and float arithmetic on ordinary tensors: the float8 dtypes are the oracle here")


MUTANTS = [
    Mutant("no saturation", "        if saturate:\n            a = a.clamp(max=f.max)  # infinities too; NaN stays NaN\n", "",
           expect="must clamp to +-max"),
    Mutant("sign of -0.0 lost", "sign = torch.signbit(x).to(torch.int64)", "sign = (x < 0).to(torch.int64)", expect="sign of -0.0 is lost"),
    Mutant("float32 detour", "x = x.detach().to(torch.float64)", "x = x.detach().to(torch.float32).to(torch.float64)",
           expect="is read through float32"),
    Mutant("E4M3 overflow to the inf pattern", "overflow = f.inf_code if f.has_inf else f.nan_code",
           "overflow = ((1 << f.exp_bits) - 1) << f.man_bits", expect="has no inf code"),
    Mutant("NaN not handled", "        code = torch.where(torch.isnan(x), (sign << 7) | f.nan_code, code)\n", "",
           expect="NaN must encode to a NaN code"),
    Mutant("overflow not detected", "ok = torch.isfinite(a) & (q <= f.max)", "ok = torch.isfinite(a)", expect="without saturation"),
    Mutant("encode through torch's cast",
           "        f = self.fmt\n        x = x.detach().to(torch.float64)\n",
           "        f = self.fmt\n        x = x.detach().to(torch.float64)\n        if saturate:\n"
           "            return x.clamp(-f.max, f.max).to(f.torch_dtype).view(torch.uint8)\n",
           expect="is read through float32"),
]

_ALT_CODEC = '''
    def _table(self):
        """(values of the 256 codes as Python floats) built from bit strings, one code at a time."""
        f = self.fmt
        vals = []
        for c in range(256):
            bits = format(c, "08b")
            s, e, m = int(bits[0]), int(bits[1:1 + f.exp_bits], 2), int(bits[1 + f.exp_bits:], 2)
            top = 2**f.exp_bits - 1
            if f.has_inf and e == top:
                v = math.inf if m == 0 else math.nan
            elif not f.has_inf and e == top and m == 2**f.man_bits - 1:
                v = math.nan
            else:
                v = math.ldexp((m / 2**f.man_bits) + (1 if e else 0), max(e, 1) - f.bias)
            vals.append(-v if s else v)
        return vals

    def decode(self, codes):
        ### BEGIN SOLUTION
        table = torch.tensor(self._table(), dtype=torch.float64)
        return table[codes.to(torch.int64) & 0xFF].to(torch.float32)
        ### END SOLUTION

    def encode(self, x, saturate=True):
        ### BEGIN SOLUTION
        f = self.fmt
        vals = self._table()
        pos = sorted((v, c) for c, v in enumerate(vals[:128]) if math.isfinite(v))  # non-negative codes, ascending
        top_v, top_c = pos[-1]
        nxt = 2.0 ** (math.floor(math.log2(top_v)) + 1) if f.has_inf else top_v + 2.0 ** (math.floor(math.log2(top_v)) - f.man_bits)
        grid = torch.tensor([v for v, _ in pos] + [nxt], dtype=torch.float64)  # + the first value beyond max
        gcode = torch.tensor([c for _, c in pos] + [0x7C if f.has_inf else 0x7F], dtype=torch.int64)
        x = x.detach().to(torch.float64)
        a = x.abs()
        if saturate:
            a = a.clamp(max=top_v)
        a = torch.where(torch.isinf(a), torch.full_like(a, 2 * nxt), a)
        hi = torch.searchsorted(grid, a.clamp(max=nxt).contiguous()).clamp(1, len(grid) - 1)
        lo = hi - 1
        dlo, dhi = a - grid[lo], grid[hi] - a
        take_hi = (dhi < dlo) | ((dhi == dlo) & (gcode[hi] % 2 == 0))
        idx = torch.where(a <= grid[0], torch.zeros_like(hi), torch.where(take_hi, hi, lo))
        code = gcode[idx]
        code = torch.where(a > nxt, gcode[-1], code)
        code = code | (torch.signbit(x).to(torch.int64) << 7)
        code = torch.where(torch.isnan(x), (torch.signbit(x).to(torch.int64) << 7) | 0x7F, code)
        return code.to(torch.uint8)
        ### END SOLUTION
'''


ALTERNATIVES = [
    Alternative("a table of the 256 values and a nearest-code search (defined after, so it replaces decode / encode)",
                old="    def _check(self, x: torch.Tensor, granularity: str) -> None:",
                new=_ALT_CODEC + "\n    def _check(self, x: torch.Tensor, granularity: str) -> None:"),
]
