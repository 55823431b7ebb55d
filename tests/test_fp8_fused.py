"""The fused FP8 quantisers (course_lib/deepseek/fp8_fused.py) against the plain-torch emulation, and FP8Linear's weight cache.

The Triton kernels run here in Triton's CPU interpreter (``fp8_fused.enable_interpreter()``, which sets
TRITON_INTERPRET=1 for this process before Triton is imported); on a GPU, ``make gpu-check`` runs the same
kernels compiled and measures how often a code differs. Codes are compared as bytes, scales exactly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from course_lib.deepseek import fp8, fp8_fused

INTERPRETER = fp8_fused.enable_interpreter()
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf / inf in the interpreter
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="Triton is not installed, or was imported in compiled mode before this module (no interpreter)")


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    (gq, gs), (wq, ws) = got, want
    assert gq.dtype == torch.float8_e4m3fn and gs.dtype == torch.float32, what
    assert gq.shape == wq.shape and gs.shape == ws.shape, f"{what}: shapes {gq.shape}/{gs.shape} vs {wq.shape}/{ws.shape}"
    torch.testing.assert_close(gs, ws, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: scales differ: {m}")
    diff = fp8_fused.code_differences(gq, wq)  # NaN codes match whatever their sign
    assert not diff.any(), (f"{what}: {int(diff.sum())} codes differ, e.g. {gq.view(torch.uint8)[diff][:5].tolist()} "
                            f"vs {wq.view(torch.uint8)[diff][:5].tolist()}")


def edge_cases(rows: int = 24, cols: int = 300, seed: int = 0) -> torch.Tensor:
    """Random rows plus every special case the recipe defines, in separate 1x128 tiles (and 128x128 blocks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)
    x[0] = 0.0  # amax floor: scale 1e-4 / 448, codes all zero
    x[1, :128] = 1e-9  # tiny values under the floor: subnormal codes or zero
    x[1, 5] = -0.0
    x[2, 3] = float("nan")  # NaN: its whole tile (and its scale) NaN
    x[3, 130] = float("inf")  # inf: scale inf, NaN at the inf, signed zeros elsewhere
    x[3, cols - 1] = -float("inf")
    x[4, :128] = 3e38  # near float32's max
    x[5, 140:] = -5e-3
    return x


def saturating_row(n: int = 128, seed: int = 1) -> torch.Tensor:
    """Values whose x / scale rounds above 448 (amax / (amax / 448) > 448 in float32): the cast must saturate."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.rand(200000, generator=g) * 100 + 0.01
    over = cand[(cand / (cand / 448.0)) > 448.0]
    assert over.numel() >= 8, "expected some float32 values whose amax / scale exceeds 448"
    row = torch.randn(n, generator=g)
    row[: min(n, 8)] = -over[:8] if seed % 2 else over[:8]
    return row


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tiles_bit_equal_to_emulation_with_edge_cases(dtype):
    x = edge_cases().to(dtype)
    assert_same(fp8_fused.quantize_tiles_fused(x), fp8.quantize_tiles(x), f"1x128 tiles, {dtype}")


@needs_interpreter
def test_every_code_and_midpoint_rounds_like_torch():
    """A tile whose amax is 448 has scale exactly 1: the kernel's integer rounding meets every E4M3 value and tie."""
    vals = fp8.decode(fp8.all_codes()).double()
    finite = vals[torch.isfinite(vals)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties: round half to even
    pts = torch.cat([finite, mids, mids.nextafter(torch.tensor(math.inf, dtype=torch.float64))]).float()
    pad = (-pts.numel()) % 127
    pts = torch.cat([pts, torch.zeros(pad)]).reshape(-1, 127)
    x = torch.cat([pts, torch.full((pts.shape[0], 1), 448.0)], dim=1)  # (rows, 128), amax 448 per tile
    q, s = fp8_fused.quantize_tiles_fused(x)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8)), "rounding differs from torch's cast"
    assert_same((q, s), fp8.quantize_tiles(x), "all codes")


@needs_interpreter
def test_values_above_448_after_division_saturate():
    x = torch.stack([saturating_row(seed=1), saturating_row(seed=2)])
    q, s = fp8_fused.quantize_tiles_fused(x)
    assert_same((q, s), fp8.quantize_tiles(x), "saturation")
    assert q.float().abs().max() == 448.0 and not torch.isnan(q.float()).any(), "x / scale > 448 must give 448, not NaN"


@needs_interpreter
def test_strided_and_batched_inputs_are_read_in_place():
    x = edge_cases(rows=20, cols=260, seed=3)
    assert_same(fp8_fused.quantize_tiles_fused(x.t()), fp8.quantize_tiles(x.t()), "transposed view (Wgrad's dy^T)")
    x3 = x[:, :200].reshape(2, 10, 200)
    q, s = fp8_fused.quantize_tiles_fused(x3)
    assert q.shape == (2, 10, 200) and s.shape == (2, 10, 2)
    assert_same((q, s), fp8.quantize_tiles(x3), "3-D (batch, seq, K)")


@needs_interpreter
def test_blocks_bit_equal_to_emulation_including_ragged_edges():
    w = edge_cases(rows=260, cols=300, seed=4)
    assert_same(fp8_fused.quantize_blocks_fused(w), fp8.quantize_blocks(w), "128x128 blocks, 260x300 with edge cases")
    w = torch.randn(260, 300)
    w[140:150, 135] = float("nan")  # NaN: block (1, 1) NaN, every other block finite
    got = fp8_fused.quantize_blocks_fused(w)
    assert_same(got, fp8.quantize_blocks(w), "128x128 blocks with a NaN")
    assert torch.isnan(got[1]).sum() == 1 and torch.isnan(got[1][1, 1])
    assert torch.isnan(got[0].float()).sum() == 128 * 128
    with pytest.raises(ValueError, match="2-D"):
        fp8_fused.quantize_blocks_fused(torch.randn(2, 3, 4))


@needs_interpreter
def test_wgrad_requantisation_of_the_cached_activation():
    x = edge_cases(rows=150, cols=260, seed=5)
    xq, xs = fp8.quantize_tiles(x)
    got = fp8_fused.requantize_tiles_t_fused(xq, xs)
    assert got[0].shape == (260, 150) and got[1].shape == (260, 2)
    assert_same(got, fp8.quantize_tiles(fp8.dequantize(xq, xs).t()), "re-tiled x^T")
    with pytest.raises(ValueError, match="one scale per 1x128 tile"):
        fp8_fused.requantize_tiles_t_fused(xq, xs[:, :1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_fused.requantize_tiles_t_fused(x, xs)


@needs_interpreter
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="floating-point"):
        fp8_fused.quantize_tiles_fused(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one dimension"):
        fp8_fused.quantize_tiles_fused(torch.tensor(1.0))
    q, s = fp8_fused.quantize_tiles_fused(torch.empty(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)


def fp8_linear_run(fused: str, x, w, gy):
    old = fp8.set_fused_quantisers(fused)
    try:
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xx, ww, recipe="blockwise")
        y.backward(gy)
        return y.detach(), xx.grad, ww.grad
    finally:
        fp8.set_fused_quantisers(old)


@needs_interpreter
def test_fp8_linear_through_the_kernels_equals_the_plain_torch_path_and_float64():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 40, 256, generator=g) * torch.linspace(0.1, 10, 256)
    w = torch.randn(136, 256, generator=g) / 16
    gy = torch.randn(2, 40, 136, generator=g)
    fused = fp8_linear_run("always", x, w, gy)
    plain = fp8_linear_run("never", x, w, gy)
    for name, a, b in zip(("y", "dx", "dW"), fused, plain):
        assert torch.equal(a, b), f"{name}: the fused quantisers changed the result"
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = x64 @ w64.t()
    y64.backward(gy.double())
    for name, a, ref in zip(("y", "dx", "dW"), fused, (y64.detach(), x64.grad, w64.grad)):
        err = float((a.double() - ref).norm() / ref.norm())
        assert err < 0.06, f"{name}: {100 * err:.1f}% from float64 (E4M3 gives ~3-5%)"


def test_set_fused_quantisers_rejects_unknown_modes_and_cpu_auto_stays_plain_torch():
    with pytest.raises(ValueError, match="auto"):
        fp8.set_fused_quantisers("sometimes")
    assert not fp8._use_fused(torch.randn(4, 128), "e4m3"), "auto mode must keep CPU tensors on the plain-torch quantisers"
    assert not fp8._use_fused(torch.randn(4, 128), "e5m2"), "the kernels write E4M3 only"


def test_fp8_linear_quantises_its_weight_once_per_optimiser_step():
    torch.manual_seed(7)
    layer = fp8.FP8Linear(256, 128, recipe="blockwise")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 256)
    y1 = layer(x)
    y2 = layer(x)
    assert layer.weight_quantisations == 1, "a second forward in the same step re-quantised the weight"
    assert torch.equal(y1, y2)
    assert torch.equal(y1, fp8.fp8_linear(x, layer.weight.detach(), recipe="blockwise")), "the cached weight gives another result"
    (y1.square().mean() + y2.square().mean()).backward()
    opt.step()
    y3 = layer(x)
    assert layer.weight_quantisations == 2, "optimizer.step() changed the weight but the stale FP8 copy was used"
    assert torch.equal(y3, fp8.fp8_linear(x, layer.weight.detach(), recipe="blockwise"))
    layer(x)
    assert layer.weight_quantisations == 2
    layer.load_state_dict({"weight": torch.randn(128, 256)})
    torch.testing.assert_close(layer(x), fp8.fp8_linear(x, layer.weight.detach(), recipe="blockwise"), rtol=0, atol=0)
    assert layer.weight_quantisations == 3, "load_state_dict must invalidate the cache"
    layer.invalidate_weight_cache()
    layer(x)
    assert layer.weight_quantisations == 4


COMPILE_FOR_HOPPER = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from course_lib.deepseek import fp8_triton
ptrs = {"x_ptr": "*bf16", "xs_ptr": "*fp32", "q_ptr": "*u8", "s_ptr": "*fp32"}
ints = {n: "i32" for n in ("R", "C", "sxr", "sxc", "sxsr", "sxsc", "sqr", "sqc", "ssr", "ssc")}
out = {}
for name, blocks, codes, precise in (("tiles", 0, 0, 1), ("blocks", 1, 0, 1), ("retile", 0, 1, 1), ("tiles_fast_div", 0, 0, 0)):
    const = {"BLOCKS": bool(blocks), "IN_CODES": bool(codes), "IN_TR": 128 if codes else 1, "IN_TC": 1, "PRECISE": bool(precise),
             "BR": 128 if blocks else 16, "BC": 128, "SUB": 32}
    sig = {**ptrs, **ints, **{k: "constexpr" for k in const}}
    if codes:
        sig["x_ptr"] = "*u8"
    src = ASTSource(fn=fp8_triton.quant_kernel, signature=sig, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    out[name] = {"div_rn": "div.rn.f32" in ptx, "div_full": "div.full.f32" in ptx or "div.approx.f32" in ptx}
print(json.dumps(out))
"""


@pytest.mark.skipif(not fp8_fused.available(), reason="Triton is not installed")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton's compiler runs on a CPU: the kernels must compile to sm_90 PTX (the interpreter checks no types),
    with correctly rounded division where ``precise`` and Triton's approximate one otherwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("tiles", "blocks", "retile"):
        assert ptx[name]["div_rn"] and not ptx[name]["div_full"], f"{name}: expected only div.rn.f32 in the PTX, got {ptx[name]}"
    assert ptx["tiles_fast_div"]["div_full"], "precise=False should use Triton's default (approximate) division"


def test_code_differences_matches_nan_codes_of_either_sign_only():
    a = torch.tensor([0x7F, 0xFF, 0x7E, 0x00, 0x80], dtype=torch.uint8).view(torch.float8_e4m3fn)
    b = torch.tensor([0xFF, 0x7F, 0x7F, 0x80, 0x80], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert fp8_fused.code_differences(a, b).tolist() == [False, False, True, True, False], "448 is not NaN, +0 is not -0"
