"""Exercise 4.3: StabilityMonitor (overflow / underflow / NaN counts, amax history, delayed scale, gradient health)."""

from __future__ import annotations

import math

import torch

from course_judge.checks import assert_true, expect_float
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8._common import batch
from course_judge.s04_fp8.trainer import _kernel_module
from course_lib.deepseek.fp8_formats import E4M3, E5M2, FP8Format

GRADE_ID = "test_04_3_monitor"
POINTS = 4.5
ANSWERS = ("ex_04_3_monitor",)
SUMMARY = ("overflow (|x/scale| above max + half a top step), underflow (nonzero, at or below half the smallest subnormal) and "
           "NaN/inf counts in E4M3 and E5M2 with their rounding edges, amax over finite values, alerts, the amax history and "
           "delayed scale, a spike under delayed vs online scaling, the global gradient norm (with its square root), "
           "non-finite gradients by name, diagnose")
REFERENCE = ()

OVER_MAX = ("overflow counted above max ({mx:g}): values up to max + half a top step ({over:g}) still round to max; "
            "count |x/scale| above the monitor's overflow_above")
UNDER_SUB = ("underflow counted below the smallest subnormal: values above half of it round up to it; count nonzero "
             "|x/scale| at or below half the smallest subnormal (underflow_at_or_below)")
UNDER_NORMAL = ("underflow counted below the smallest NORMAL number: subnormals still hold values; only |x/scale| at or below "
                "half the smallest subnormal rounds to zero")
UNDER_HALF_OPEN = "exactly half the smallest subnormal rounds to zero (tie to the even code 0): count it, use <="
ZEROS = "exact zeros are counted as underflows: count only nonzero values that round to zero"
SCALE_IGNORED = "the counts ignore the scale: compare |x / scale| (what the cast sees) with the thresholds"
INF_OVERFLOW = "non-finite values are counted as overflows: overflow counts finite entries only (inf and NaN are 'nonfinite')"
NAN_ONLY = "nonfinite must count inf as well as NaN"
NO_SQRT = "the gradient norm is missing its square root: the global L2 norm is sqrt(sum of all squared gradient entries)"


def _thresholds(f: FP8Format) -> tuple[float, float]:
    top_step = 2.0 ** (math.floor(math.log2(f.max)) - f.man_bits)
    return f.max + top_step / 2, f.min_subnormal / 2


def _counts(x: torch.Tensor, f: FP8Format, scale: float = 1.0) -> dict[str, dict[str, int]]:
    """{"overflow" | "underflow" | "nonfinite": {diagnosis or "": count}}: the right count (key "") and known mistakes'."""
    over, under = _thresholds(f)
    x = x.double()
    fin = torch.isfinite(x)
    a = (x / scale).abs()
    n = lambda m: int(m.sum())  # noqa: E731
    return {
        "overflow": {"": n(fin & (a > over)), OVER_MAX.format(mx=f.max, over=over): n(fin & (a > f.max)),
                     SCALE_IGNORED: n(fin & (x.abs() > over)), INF_OVERFLOW: n(~torch.isnan(x) & (a > over))},
        "underflow": {"": n(fin & (x != 0) & (a <= under)), UNDER_HALF_OPEN: n(fin & (x != 0) & (a < under)),
                      UNDER_SUB: n(fin & (x != 0) & (a < f.min_subnormal)), ZEROS: n(fin & (a <= under)),
                      UNDER_NORMAL: n(fin & (x != 0) & (a < f.min_normal)), SCALE_IGNORED: n(fin & (x != 0) & (x.abs() <= under))},
        "nonfinite": {"": n(~fin), NAN_ONLY: n(torch.isnan(x))},
    }


def _check_counts(st, x, f: FP8Format, scale: float, what: str) -> None:
    assert_true(isinstance(st, dict) and {"amax", "overflow", "underflow", "nonfinite"} <= set(st),
                f"observe should return a dict with amax, overflow, underflow, nonfinite; got {st!r:.120}")
    for kind, cands in _counts(x, f, scale).items():
        got = st[kind]
        assert_true(isinstance(got, int) and not isinstance(got, bool) or (isinstance(got, torch.Tensor) and got.numel() == 1),
                    f"{what}: {kind} should be an int count, got {type(got).__name__}")
        got = int(got)
        if got != cands[""]:
            why = next((w for w, c in cands.items() if w and c == got and c != cands[""]), None)
            assert_true(False, f"{what}: {kind} count {got}, expected {cands['']}", hint=why)
    fin = torch.isfinite(x)
    amax = float(x[fin].abs().max()) if bool(fin.any()) else 0.0
    got = expect_float(st["amax"], f"{what}: amax")
    if not (abs(got - amax) <= 1e-6 * max(amax, 1e-30)):
        why = ("amax must be taken over the finite entries only (inf/NaN excluded)" if not math.isfinite(got)
               else "amax is of x itself, not of x / scale" if abs(got - amax / scale) <= 1e-6 * amax / scale else None)
        assert_true(False, f"{what}: amax {got:g}, expected {amax:g}", hint=why)


def judge(k, t):
    Mon = k.g.StabilityMonitor
    listing, getattr_ = k.lib("builtins:list"), k.lib("builtins:getattr")
    with t.part("visible checks: one overflow, one underflow, one NaN, amax 500, the amax history", 1.5):
        mon = k.call_opts(Mon, ("e4m3",), keep=True)
        x = torch.tensor([1.0, -500.0, 1e-4, 0.0, math.nan])
        st = mon.observe("act", x)
        _check_counts(st, x, E4M3, 1.0, "observe([1, -500, 1e-4, 0, nan])")
        hist = k.call(listing, mon.amax_history["act"])
        assert_true(hist == [500.0], f"observe should record amax in amax_history[name]: got {hist}")

    g = torch.Generator().manual_seed(46)
    with t.part("counts in E4M3 and E5M2 with a scale (NaN, inf, zeros, 14 decades), the rounding edges (max + half a step, half "
                "the smallest subnormal), one alert per nonzero kind", 1.5):
        for f in (E4M3, E5M2):
            mon = k.call_opts(Mon, (f.name,), {"history": 4}, keep=True)
            x = torch.randn(5000, generator=g) * 10 ** torch.empty(5000).uniform_(-8, 6, generator=g)
            x[::97] = math.nan
            x[::101] = math.inf
            x[::103] = 0.0
            over, half = _thresholds(f)
            sub = f.min_subnormal
            edges = (torch.tensor([half, half * 1.01, -half, 0.9 * sub, sub, 3 * sub, 0.0, -0.0, 0.0]),
                     torch.tensor([f.max, (f.max + over) / 2, over, over * 1.0001, -over * 1.01]))
            st, alerts, *st_edges = batch(k, [(mon.observe, ("x", x), {"scale": 3.0}), (getattr_, (mon, "alerts"), {})]
                                          + [(mon.observe, ("edge", e), {}) for e in edges])
            _check_counts(st, x, f, 3.0, f"{f.name}: observe(x, scale=3)")
            kinds = {a[1] for a in alerts}
            assert_true(kinds == {"overflow", "underflow", "nonfinite"}, f"{f.name}: one alert per nonzero kind, got kinds {sorted(kinds)}",
                        hint="append (name, kind, count) to self.alerts for each of overflow, underflow, nonfinite that is nonzero")
            for edge, st_e in zip(edges, st_edges):
                _check_counts(st_e, edge, f, 1.0, f"{f.name}: observe({[f'{v:.4g}' for v in edge.tolist()]})")
        mon = k.call_opts(Mon, ("e4m3",), keep=True)
        st, alerts = batch(k, [(mon.observe, ("quiet", torch.tensor([1.0, 2.0])), {}), (getattr_, (mon, "alerts"), {})])
        assert_true(st["overflow"] == st["underflow"] == st["nonfinite"] == 0 and alerts == [],
                    "a tensor without problems must raise no alert (only nonzero counts are alerts)")

    with t.part("the amax history and delayed scale, a spike under delayed vs online scaling, the gradient norm with its square "
                "root, non-finite gradients by name, diagnose", 1.5):
        for f in (E4M3, E5M2):
            mon = k.call_opts(Mon, (f.name,), {"history": 4}, keep=True)
            *_, hist, ds, ds0 = batch(k, [(mon.observe, ("h", torch.tensor([v])), {}) for v in (9.0, 5.0, 2.0, 3.0, 4.0)]
                                      + [(listing, (mon.amax_history["h"],), {}), (mon.delayed_scale, ("h",), {}),
                                         (mon.delayed_scale, ("never seen",), {})])
            assert_true(hist == [5.0, 2.0, 3.0, 4.0], f"{f.name}: the amax history keeps the last `history` (4) values: got {hist}")
            ds = expect_float(ds, "delayed_scale")
            why = ("the delayed scale uses the latest amax: take max(amax history)" if abs(ds - 4.0 / f.max) < 1e-12
                   else "the delayed scale uses the mean of the history: take max(amax history)" if abs(ds - 3.5 / f.max) < 1e-12
                   else "the delayed scale is stored as its reciprocal: max(amax history) / fmt.max" if abs(ds - f.max / 5.0) < 1e-9
                   else None)
            assert_true(abs(ds - 5.0 / f.max) < 1e-12, f"{f.name}: delayed scale {ds:g}, expected {5.0 / f.max:g}", hint=why)
            ds = expect_float(ds0, "delayed_scale('never seen')")
            assert_true(ds == 1.0, f"no history -> scale 1.0, got {ds}")
        mon = k.call_opts(Mon, ("e4m3",), keep=True)
        got = batch(k, [(mon.observe, ("a", torch.randn(1024, generator=g)), {}) for _ in range(8)] + [(mon.delayed_scale, ("a",), {})])
        spike = torch.randn(1024, generator=g) * 100
        st_d = mon.observe("a", spike, scale=expect_float(got[-1], "delayed_scale('a')"))
        st_o = mon.observe("a2", spike, scale=float(spike.abs().max()) / 448)
        assert_true(st_d["overflow"] > 0 and st_o["overflow"] == 0, "a 100x spike should overflow with the delayed scale only "
                    f"(overflows: delayed {st_d['overflow']}, online {st_o['overflow']})")
        k.seed(7)
        net = _kernel_module(k, ("torch.nn:Sequential", (), [("torch.nn:Linear", (4, 3), []), ("torch.nn:Linear", (3, 2), [])]))
        xin = torch.randn(5, 4, generator=g) * 3
        r = k.grad(net, xin, wrt=[], params=net)
        grads = r.param_grads
        sq = sum(float(v.double().pow(2).sum()) for v in grads.values())
        want = math.sqrt(sq)
        rep = mon.check_gradients(net)
        assert_true(isinstance(rep, dict) and {"grad_norm", "nonfinite"} <= set(rep),
                    f"check_gradients should return a dict with grad_norm and nonfinite; got {rep!r:.120}")
        got = expect_float(rep["grad_norm"], "grad_norm")
        norms = [math.sqrt(float(v.double().pow(2).sum())) for v in grads.values()]
        why = (NO_SQRT if abs(got - sq) < 1e-5 * sq
               else "the gradient norm is the sum of per-parameter norms: the global L2 norm is sqrt of the sum of ALL squares"
               if abs(got - sum(norms)) < 1e-5 * sum(norms)
               else "the gradient norm is the largest per-parameter norm: the global L2 norm covers every parameter"
               if abs(got - max(norms)) < 1e-5 * max(norms) else None)
        assert_true(abs(got - want) < 1e-5 * want, f"gradient norm {got:.6g}, expected {want:.6g}", hint=why)
        assert_true(rep["nonfinite"] == [], f"finite gradients: nonfinite should be [], got {rep['nonfinite']}")
        bad = grads["1.weight"].clone()
        bad[0, 0] = math.nan
        k.set(net[1].weight.grad, bad)
        rep = mon.check_gradients(net)
        assert_true(rep["nonfinite"] == ["1.weight"], f"non-finite gradients should be reported by name, got {rep['nonfinite']}",
                    hint="names from model.named_parameters(), of parameters whose gradient holds NaN/inf")
        assert_true(not math.isfinite(expect_float(rep["grad_norm"], "grad_norm")), "a NaN gradient makes the norm non-finite")
        lines = mon.diagnose()
        assert_true(isinstance(lines, list) and any("nonfinite grad" in str(ln) for ln in lines),
                    "diagnose should mention the non-finite gradient ('nonfinite grad')",
                    hint="check_gradients adds a (name, 'nonfinite grad', count) alert for each bad parameter")


MUTANTS = [
    Mutant("overflow counted above max", '"overflow": int((finite & (a > self.overflow_above)).sum()),',
           '"overflow": int((finite & (a > self.fmt.max)).sum()),', expect="overflow counted above max"),
    Mutant("underflow below the smallest subnormal", "(a <= self.underflow_at_or_below)", "(a < self.fmt.min_subnormal)",
           expect="underflow counted below the smallest subnormal"),
    Mutant("zeros counted as underflows", '"underflow": int((finite & (x != 0) & (a <= self.underflow_at_or_below)).sum()),',
           '"underflow": int((finite & (a <= self.underflow_at_or_below)).sum()),', expect="exact zeros are counted"),
    Mutant("scale ignored", "a = (x / scale).abs()", "a = x.abs()", expect="ignore the scale"),
    Mutant("gradient norm without the square root", '"grad_norm": math.sqrt(sq) if math.isfinite(sq) else sq,', '"grad_norm": sq,',
           expect="missing its square root"),
    Mutant("delayed scale from the latest amax", "return max(hist) / self.fmt.max", "return hist[-1] / self.fmt.max",
           expect="uses the latest amax"),
    Mutant("amax over non-finite values", '"amax": float(x[finite].abs().max()) if bool(finite.any()) else 0.0,',
           '"amax": float(x.abs().max()),', expect="finite entries only"),
    Mutant("inf counted as overflow", '"overflow": int((finite & (a > self.overflow_above)).sum()),',
           '"overflow": int((~torch.isnan(x) & (a > self.overflow_above)).sum()),', expect="non-finite values are counted as overflows"),
    Mutant("nonfinite counts only NaN", '"nonfinite": int((~finite).sum()),', '"nonfinite": int(torch.isnan(x).sum()),',
           expect="inf as well as NaN"),
    Mutant("underflow with <", "(a <= self.underflow_at_or_below)", "(a < self.underflow_at_or_below)", expect="use <="),
]

ALTERNATIVES = [
    Alternative("count_nonzero, logical masks and a vector norm over all gradients", old='''        x = x.detach().float()
        finite = torch.isfinite(x)
        a = (x / scale).abs()
        stats = {
            "amax": float(x[finite].abs().max()) if bool(finite.any()) else 0.0,
            "overflow": int((finite & (a > self.overflow_above)).sum()),
            "underflow": int((finite & (x != 0) & (a <= self.underflow_at_or_below)).sum()),
            "nonfinite": int((~finite).sum()),
        }''', new='''        xd = x.detach().double()
        ok = ~(torch.isnan(xd) | torch.isinf(xd))
        mag = torch.where(ok, xd.abs() / scale, torch.zeros_like(xd))
        stats = {
            "amax": float(torch.where(ok, xd.abs(), torch.zeros_like(xd)).max()) if xd.numel() else 0.0,
            "overflow": int(torch.count_nonzero(mag > self.overflow_above)),
            "underflow": int(torch.count_nonzero(torch.logical_and(xd != 0, mag <= self.underflow_at_or_below) & ok)),
            "nonfinite": int(torch.count_nonzero(~ok)),
        }'''),
]
