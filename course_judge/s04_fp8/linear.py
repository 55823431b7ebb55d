"""Exercise 4.1 (linear): FP8LinearFunction, whose Fprop, Dgrad and Wgrad GEMMs all take E4M3 inputs."""

from __future__ import annotations

import math
from functools import partial

import torch

from course_judge.checks import assert_true, expect_tensor
from course_judge.local import Alternative, Mutant
from course_judge.s04_fp8._common import close, rel
from course_lib.deepseek import fp8 as ref

GRADE_ID = "test_04_1_linear"
POINTS = 6
ANSWERS = ("ex_04_1_linear",)
SUMMARY = ("Fprop, Dgrad and Wgrad against DeepSeek's recipe (E4M3 everywhere, x and dy in 1x128 tiles, W in 128x128 blocks reused "
           "transposed by Dgrad, dy^T and the cached x^T re-tiled along the tokens for Wgrad) for 2-D and 3-D inputs; "
           "~4% from FP32; bf16 in, bf16 out; FP32 weight gradient; the master weight untouched")
REFERENCE = ("course_lib.deepseek.fp8",)

E5M2_ACT = "E5M2 for the activations: DeepSeek uses E4M3 for all GEMM inputs (Fprop, Dgrad and Wgrad)"
E5M2_W = "E5M2 for the weights: DeepSeek uses E4M3 for all GEMM inputs (Fprop, Dgrad and Wgrad)"
E5M2_GRAD = "E5M2 for the gradients dy: DeepSeek uses E4M3 for all GEMM inputs (Fprop, Dgrad and Wgrad)"


def _q(x: torch.Tensor, how: str, fmt: str = "e4m3") -> torch.Tensor:
    """float64 values of ``x`` after quantising it: "tile" (1x128), "block" (128x128) or "none"."""
    if how == "none":
        return x.double()
    q, s = ref.quantize_tiles(x, fmt) if how == "tile" else ref.quantize_blocks(x, fmt)
    return ref.dequantize(q, s).double()


def _recipe(x2, w, gy2, *, x_how="tile", w_how="block", x_fmt="e4m3", w_fmt="e4m3", dgrad_g="tile", dgrad_fmt="e4m3",
            dgrad_w="fp8", wgrad="tokens", wgrad_fmt="e4m3"):
    """(y, dx, dW) in float64 of an FP8 linear layer, with one known mistake at a time (the defaults: DeepSeek's recipe)."""
    xd, wd = _q(x2, x_how, x_fmt), _q(w, w_how, w_fmt)
    y = xd @ wd.T
    gd = _q(gy2, dgrad_g, dgrad_fmt)
    dx = gd @ (wd if dgrad_w == "fp8" else w.double())
    if wgrad == "tokens":  # DeepSeek: dy^T and the cached FP8 activation's x^T, both 1x128 along M
        dw = _q(gy2.t().contiguous(), "tile", wgrad_fmt) @ _q(xd.float().t().contiguous(), "tile").T
    elif wgrad == "forward tiles":  # dy tiles along N, x's forward tiles along K: no re-tiling
        dw = _q(gy2, "tile", wgrad_fmt).T @ xd
    elif wgrad == "fp32 x":  # re-tiles the FP32 activation instead of the cached FP8 one
        dw = _q(gy2.t().contiguous(), "tile", wgrad_fmt) @ _q(x2.t().contiguous(), "tile").T
    elif wgrad == "dy unquantised":
        dw = gy2.double().T @ xd
    else:  # fp32
        dw = gy2.double().T @ x2.double()
    return y, dx, dw


def _mistakes(x2, w, gy2) -> dict[str, dict[str, torch.Tensor]]:
    """{"y" | "dx" | "dw": {diagnosis: value}} of the known mistakes."""
    out: dict[str, dict[str, torch.Tensor]] = {"y": {}, "dx": {}, "dw": {}}

    def add(what, which, **kw):
        y, dx, dw = _recipe(x2, w, gy2, **kw)
        for key, v in (("y", y), ("dx", dx), ("dw", dw)):
            if key in which:
                out[key].setdefault(what, v)

    add(E5M2_ACT, "ydw", x_fmt="e5m2")
    add(E5M2_W, "ydx", w_fmt="e5m2")
    add(E5M2_ACT.replace("activations", "activations and weights"), "ydxdw", x_fmt="e5m2", w_fmt="e5m2")
    add("the weight is quantised in 1x128 tiles: DeepSeek's weights take 128x128 blocks (so Dgrad can reuse them transposed)",
        "ydx", w_how="tile")
    add("the activation x is quantised in 128x128 blocks: activations take 1x128 tiles (one scale per token and 128 channels)",
        "y", x_how="block")
    add("Fprop is not quantised: x and W must enter the GEMM as E4M3 (x in 1x128 tiles, W in 128x128 blocks)", "y", x_how="none",
        w_how="none")
    add(E5M2_GRAD, "dx", dgrad_fmt="e5m2")
    add("Dgrad uses the FP32 master weight: dx = dy W reads W's FP8 128x128 blocks (transposed)", "dx", dgrad_w="fp32")
    add("Dgrad's dy is not quantised: dy enters the GEMM in E4M3, 1x128 tiles along N", "dx", dgrad_g="none")
    add("Dgrad is not quantised at all: dy (1x128 tiles) and W (its FP8 blocks) must both be E4M3", "dx", dgrad_g="none", dgrad_w="fp32")
    add(E5M2_GRAD, "dw", wgrad_fmt="e5m2")
    add("Wgrad reuses the forward's tiles (x along K, dy along N): re-tile dy^T and x^T in 1x128 tiles along the tokens M",
        "dw", wgrad="forward tiles")
    add("Wgrad re-quantises the FP32 activation: DeepSeek re-tiles the cached FP8 activation (dequantise it, then quantise x^T)",
        "dw", wgrad="fp32 x")
    add("Wgrad's dy^T is not quantised: it enters the GEMM in E4M3, 1x128 tiles along the tokens", "dw", wgrad="dy unquantised")
    add("Wgrad is not quantised: dy^T and x^T must both be E4M3, in 1x128 tiles along the tokens", "dw", wgrad="fp32")
    return out


def judge(k, t):
    apply = k.g.FP8LinearFunction.apply
    with t.part("visible checks: output shape, ~4% from FP32, gradient shapes, an FP32 weight gradient", 1.5):
        torch.manual_seed(3)
        x = torch.randn(128, 256)
        w = torch.randn(128, 256) / 16
        r = k.grad(apply, x, w, wrt=[0, 1])
        y = expect_tensor(r.out, "FP8 linear output", shape=(128, 128))
        e = rel(y, x @ w.T)
        assert_true(e < 0.05, f"FP8 linear output is {100 * e:.1f}% away from FP32 (expected ~3.7%)")
        gx, gw = r.grads
        expect_tensor(gx, "grad_x", shape=(128, 256))
        expect_tensor(gw, "grad_weight", shape=(128, 256))
        assert_true(gw.dtype == torch.float32, "the weight gradient must stay FP32 (master weights)")

    g = torch.Generator().manual_seed(44)
    cases = []
    for shape in ((256, 256, 384), (2, 64, 384, 128)):
        *lead, K, N = shape
        x = torch.randn(*lead, K, generator=g) * torch.linspace(0.1, 10, K)  # channels of different magnitude
        w = torch.randn(N, K, generator=g) / math.sqrt(K)
        gy = torch.randn(*lead, N, generator=g) * torch.linspace(5, 0.2, N)
        cases.append((shape, x, w, gy))
    results, memo = {}, {}

    def mistakes(shape, x, w, gy, key):
        if shape not in memo:
            memo[shape] = _mistakes(x.reshape(-1, x.shape[-1]), w, gy.reshape(-1, w.shape[0]))
        return memo[shape][key]

    def run(shape, x, w, gy):
        if shape not in results:
            results[shape] = k.grad(apply, x, w, wrt=[0, 1], grad_out=gy)
        return results[shape]

    def want(x, w, gy):
        K, N = x.shape[-1], w.shape[0]
        return _recipe(x.reshape(-1, K), w, gy.reshape(-1, N))

    with t.part("Fprop: x in 1x128 tiles, W in 128x128 blocks, both E4M3; 2-D and 3-D inputs", 1.5):
        for shape, x, w, gy in cases:
            r = run(shape, x, w, gy)
            y_w, _, _ = want(x, w, gy)
            y = expect_tensor(r.out, f"Fprop output for x {tuple(x.shape)}", shape=(*x.shape[:-1], w.shape[0]),
                              hint="y has the shape of x with the last dimension K replaced by N")
            close(y.reshape(y_w.shape), y_w, atol=1e-4 * float(y_w.abs().max()), name=f"Fprop {shape} vs DeepSeek's recipe",
                  mistakes=partial(mistakes, shape, x, w, gy, "y"),
                  mistake_rel=1e-4, hint="x in 1x128 tiles, W in 128x128 blocks, E4M3; y = fp8_gemm(...)")

    with t.part("Dgrad and Wgrad: E4M3 inputs; W's FP8 blocks transposed for dx; dy^T and the cached x^T re-tiled along the tokens "
                "for dW", 1.5):
        for shape, x, w, gy in cases:
            r = run(shape, x, w, gy)
            _, dx_w, dw_w = want(x, w, gy)
            gx, gw = r.grads
            expect_tensor(gx, f"grad_x for x {tuple(x.shape)}", shape=tuple(x.shape), hint="grad_x has the shape of x")
            expect_tensor(gw, "grad_weight", shape=tuple(w.shape))
            close(gx.reshape(dx_w.shape), dx_w, atol=1e-4 * float(dx_w.abs().max()), name=f"Dgrad {shape} vs DeepSeek's recipe",
                  mistakes=partial(mistakes, shape, x, w, gy, "dx"), mistake_rel=1e-4,
                  hint="Dgrad quantises dy in 1x128 tiles along N and uses W's FP8 blocks, transposed")
            close(gw, dw_w, atol=1e-4 * float(dw_w.abs().max()), name=f"Wgrad {shape} vs DeepSeek's recipe",
                  mistakes=partial(mistakes, shape, x, w, gy, "dw"), mistake_rel=1e-4,
                  hint="Wgrad re-quantises dy^T and x^T in 1x128 tiles along the token dimension M")

    with t.part("dtypes and accuracy: ~4% from FP32 (and not closer: FP8 inputs), bf16 in -> bf16 out, FP32 weight gradient, "
                "the master weight untouched", 1.5):
        for shape, x, w, gy in cases:
            r = run(shape, x, w, gy)
            gx, gw = r.grads
            y32, dx32, dw32 = x @ w.T, gy @ w, gy.reshape(-1, w.shape[0]).T @ x.reshape(-1, x.shape[-1])
            assert_true(rel(r.out, y32) < 0.05, f"FP8 Fprop is {100 * rel(r.out, y32):.1f}% away from FP32 (expected ~4%)")
            assert_true(rel(gx, dx32) < 0.05, f"FP8 Dgrad is {100 * rel(gx, dx32):.1f}% away from FP32 (expected ~4%)")
            assert_true(rel(gw, dw32) < 0.06, f"FP8 Wgrad is {100 * rel(gw, dw32):.1f}% away from FP32 (expected ~4.5%)")
            assert_true(rel(gx, dx32) > 0.01, "Dgrad matches FP32 too well: its inputs must be FP8 too")
            assert_true(rel(gw, dw32) > 0.01, "Wgrad matches FP32 too well: its inputs must be FP8 too")
            assert_true(gw.dtype == torch.float32, f"the weight gradient must be FP32, got {gw.dtype}")
        xb = torch.randn(128, 256, generator=g).to(torch.bfloat16)
        w0 = torch.randn(128, 256, generator=g)
        wk = k.call_opts(k.lib("torch:clone"), (w0,), keep=True)  # the master weight, left in the kernel
        r = k.grad(apply, xb, wk, wrt=[0], params=None)
        yb = expect_tensor(r.out, "output for a bf16 input")
        assert_true(yb.dtype == torch.bfloat16, f"bf16 input should give a bf16 output, got {yb.dtype}",
                    hint="return y in x.dtype (the FP32 GEMM result cast back)")
        assert_true(r.grads[0].dtype == torch.bfloat16, f"grad_x should have x's dtype (bf16), got {r.grads[0].dtype}")
        assert_true(torch.equal(k.get(wk), w0), "forward must not modify the master weight",
                    hint="quantise a copy: never write FP8 values back into the FP32 weight")
        rg = k.grad(apply, xb.float(), w0, wrt=[0, 1])
        assert_true(rg.grads[1].dtype == torch.float32, f"the weight gradient must be FP32, got {rg.grads[1].dtype}")


MUTANTS = [
    Mutant("E5M2 gradients in Dgrad", 'g_q, g_s = conv.quantize(g, "tile")  # (M, N), (M, N/128)',
           'g_q, g_s = FP8Converter("e5m2").quantize(g, "tile")  # (M, N), (M, N/128)', expect=E5M2_GRAD),
    Mutant("E5M2 activations", 'x_q, x_s = conv.quantize(x2d, "tile")  # (M, K), (M, K/128)',
           'x_q, x_s = FP8Converter("e5m2").quantize(x2d, "tile")  # (M, K), (M, K/128)', expect="E5M2 for the activations"),
    Mutant("E5M2 gradients in Wgrad", 'gt_q, gt_s = conv.quantize(g.T.contiguous(), "tile")  # (N, M), (N, M/128)',
           'gt_q, gt_s = FP8Converter("e5m2").quantize(g.T.contiguous(), "tile")  # (N, M), (N, M/128)', expect=E5M2_GRAD),
    Mutant("Dgrad with unquantised dy", "grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s.T)", "grad_x = g @ conv.dequantize(w_q, w_s)",
           expect="Dgrad's dy is not quantised"),
    Mutant("Wgrad with the forward's tiles",
           '        gt_q, gt_s = conv.quantize(g.T.contiguous(), "tile")  # (N, M), (N, M/128)\n'
           '        xt_q, xt_s = conv.quantize(x.T.contiguous(), "tile")  # (K, M), (K, M/128)\n'
           '        grad_w = fp8_gemm(gt_q, gt_s, xt_q, xt_s)  # (N, K)',
           '        grad_w = conv.dequantize(g_q, g_s).T @ x  # (N, K)', expect="reuses the forward's tiles"),
    Mutant("Wgrad in FP32", "grad_w = fp8_gemm(gt_q, gt_s, xt_q, xt_s)  # (N, K)", "grad_w = g.T @ x  # (N, K)",
           expect="Wgrad's dy^T is not quantised"),
    Mutant("weight in 1x128 tiles", 'w_q, w_s = conv.quantize(weight, "block")', 'w_q, w_s = conv.quantize(weight, "tile")',
           expect="weight is quantised in 1x128 tiles"),
    Mutant("output not cast back to x's dtype", "return y.reshape(*x.shape[:-1], -1).to(x.dtype)  # (..., N)",
           "return y.reshape(*x.shape[:-1], -1)  # (..., N)", expect="should give a bf16 output"),
    Mutant("master weight overwritten", 'w_q, w_s = conv.quantize(weight, "block")',
           'w_q, w_s = conv.quantize(weight, "block")\n        weight.data.copy_(conv.dequantize(w_q, w_s))',
           expect="must not modify the master weight"),
]

ALTERNATIVES = [
    Alternative("FP8 operands multiplied in float64 after dequantising (the same GEMM inputs), the FP32 weight kept for shapes",
                old='''        grad_x = fp8_gemm(g_q, g_s, w_q.T, w_s.T)  # (M, K): W^T is (K, N), its blocks are W's transposed
        x = conv.dequantize(x_q, x_s)  # (M, K): the cached FP8 activation
        gt_q, gt_s = conv.quantize(g.T.contiguous(), "tile")  # (N, M), (N, M/128)
        xt_q, xt_s = conv.quantize(x.T.contiguous(), "tile")  # (K, M), (K, M/128)
        grad_w = fp8_gemm(gt_q, gt_s, xt_q, xt_s)  # (N, K)''',
                new='''        grad_x = (conv.dequantize(g_q, g_s).double() @ conv.dequantize(w_q, w_s).double()).float()  # (M, K)
        x_t = conv.dequantize(x_q, x_s).t().contiguous()  # (K, M): the cached FP8 activation, transposed
        gt_q, gt_s = conv.quantize(g.t().contiguous(), "tile")  # (N, M): tiles along the tokens
        xt_q, xt_s = conv.quantize(x_t, "tile")  # (K, M)
        grad_w = (conv.dequantize(gt_q, gt_s).double() @ conv.dequantize(xt_q, xt_s).double().t()).float()  # (N, K)'''),
]
