"""Unit tests for course_lib.deepseek.fp8 (FP8 formats, fine-grained quantisation, GEMMs, FP8 linear, loss scaling)."""

from __future__ import annotations

import math

import pytest
import torch

from course_lib.deepseek import fp8
from course_lib.deepseek.fp8 import (
    AMAX_FLOOR,
    E4M3,
    E5M2,
    DynamicLossScaler,
    FP8Linear,
    accumulate_limited,
    all_codes,
    bytes_per_element,
    cast_to_fp8,
    decode,
    dequantize,
    encode,
    fp8_linear,
    quantize,
    quantize_blocks,
    quantize_rowwise,
    quantize_tensorwise,
    quantize_tiles,
    round_to_bits,
    round_to_format,
    scaled_matmul,
    scaled_matmul_cuda,
    scaled_matmul_emulated,
    sqnr_db,
)
from course_lib.testing import assert_close, expect_raises
from course_lib.utils import has_fp8_tensor_cores

FORMATS = [E4M3, E5M2]
needs_fp8_gpu = pytest.mark.skipif(not has_fp8_tensor_cores(), reason="needs a CUDA GPU with FP8 tensor cores (cc >= 8.9)")


def codes_u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def same_floats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equality that treats NaN == NaN and tells -0.0 from +0.0."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return both_nan | ((a == b) & (torch.signbit(a) == torch.signbit(b)))


# ----------------------------------------------------------------------------- formats and codec


def test_format_constants_match_spec_and_torch():
    assert (E4M3.exp_bits, E4M3.man_bits, E4M3.bias, E4M3.max, E4M3.has_inf) == (4, 3, 7, 448.0, False)
    assert (E4M3.min_normal, E4M3.min_subnormal) == (2.0**-6, 2.0**-9)
    assert (E5M2.exp_bits, E5M2.man_bits, E5M2.bias, E5M2.max, E5M2.has_inf) == (5, 2, 15, 57344.0, True)
    assert (E5M2.min_normal, E5M2.min_subnormal) == (2.0**-14, 2.0**-16)
    for f in FORMATS:
        fi = torch.finfo(f.torch_dtype)
        assert fi.max == f.max and fi.smallest_normal == f.min_normal


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_decode_all_256_codes_match_torch(fmt):
    codes = all_codes()
    want = codes.view(fmt.torch_dtype).to(torch.float32)
    got = decode(codes, fmt)
    bad = ~same_floats(got, want)
    assert not bad.any(), f"{fmt}: codes {codes[bad].tolist()} decode to {got[bad].tolist()}, torch says {want[bad].tolist()}"
    n_nan = int(torch.isnan(got).sum())
    assert n_nan == (2 if fmt is E4M3 else 6)
    assert int(torch.isinf(got).sum()) == (0 if fmt is E4M3 else 2)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_encode_inverts_decode_on_all_codes(fmt):
    codes = all_codes()
    values = decode(codes, fmt)
    back = encode(values, fmt, saturate=False)
    finite_or_inf = ~torch.isnan(values)
    assert torch.equal(back[finite_or_inf], codes[finite_or_inf])
    assert set(back[~finite_or_inf].tolist()) == {0x7F, 0xFF}  # NaN keeps its sign, canonical payload
    # torch writes the same NaN codes
    assert set(codes_u8(torch.tensor([math.nan, -math.nan]).to(fmt.torch_dtype)).tolist()) == {0x7F, 0xFF}


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_encode_matches_torch_cast_on_random_values_and_all_midpoints(fmt):
    g = torch.Generator().manual_seed(1)
    mags = 10 ** torch.empty(100_000).uniform_(-7, 6, generator=g)
    x = torch.randn(100_000, generator=g).sign() * mags
    grid = decode(all_codes(), fmt)
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -max..max
    midpoints = (grid[:-1] + grid[1:]) / 2  # every tie, exactly representable in float32
    x = torch.cat([x, midpoints, -midpoints, grid])
    want = codes_u8(x.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype))
    got = encode(x, fmt, saturate=True)
    bad = got != want
    assert not bad.any(), f"{fmt}: {x[bad][:5].tolist()} -> {got[bad][:5].tolist()}, torch {want[bad][:5].tolist()}"


def test_ties_round_to_even_mantissa():
    # E4M3 around 1: grid step 1/8. 1 + 1/16 is halfway between 1.0 (mantissa 000) and 1.125 (001) -> 1.0
    cases = {1 + 1 / 16: 1.0, 1 + 3 / 16: 1.25, 2**-10: 0.0, 3 * 2**-10: 2**-8, 232.0: 224.0, 248.0: 256.0, 464.0: 448.0}
    x = torch.tensor(list(cases), dtype=torch.float32)
    got = round_to_format(x, E4M3, saturate=False)
    assert got.tolist() == list(cases.values())
    # E5M2 around 1: grid step 1/4, tie 1.125 -> 1.0, 1.375 -> 1.5
    got = round_to_format(torch.tensor([1.125, 1.375]), E5M2)
    assert got.tolist() == [1.0, 1.5]


def test_saturation_rather_than_nan():
    x = torch.tensor([500.0, -1e6, math.inf, -math.inf])
    assert encode(x, E4M3, saturate=True).tolist() == [0x7E, 0xFE, 0x7E, 0xFE]  # +-448
    assert torch.isnan(round_to_format(x, E4M3, saturate=False)).all()  # E4M3 has no inf
    assert round_to_format(torch.tensor([1e6, -1e6]), E5M2, saturate=False).tolist() == [math.inf, -math.inf]
    for f in FORMATS:  # cast_to_fp8 clamps, whatever this torch version does on overflow
        y = cast_to_fp8(torch.tensor([1e9, -1e9]), f).to(torch.float32)
        assert y.tolist() == [f.max, -f.max]


# ----------------------------------------------------------------------------- scaled quantisation


def test_scale_shapes_and_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 512, generator=g)
    q, s = quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (6, 512) and s.shape == (6, 4)
    assert_close(s, x.reshape(6, 4, 128).abs().amax(-1) / 448, rtol=1e-6, atol=0, name="tile scale = amax / 448")
    w = torch.randn(384, 256, generator=g)
    wq, ws = quantize_blocks(w)
    assert ws.shape == (3, 2)
    assert_close(ws, w.reshape(3, 128, 2, 128).abs().amax(dim=(1, 3)) / 448, rtol=1e-6, atol=0, name="block scale")
    # ragged sizes: scales cover ceil(K / 128) tiles
    assert quantize_tiles(torch.randn(3, 200))[1].shape == (3, 2)
    assert quantize_blocks(torch.randn(130, 300))[1].shape == (2, 3)
    assert quantize_tiles(torch.randn(2, 5, 256))[1].shape == (2, 5, 2)
    assert quantize_rowwise(x)[1].shape == (6, 1)
    assert quantize_tensorwise(x)[1].shape == ()
    expect_raises(lambda: quantize_blocks(torch.randn(2, 3, 4)), ValueError, ["(N, K)"])
    expect_raises(lambda: quantize(x, "channel"), ValueError, ["granularity"])


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_block_max_lands_on_format_max(fmt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 384, generator=g) * torch.logspace(-3, 3, 4)[:, None]
    q, s = quantize_tiles(x, fmt)
    assert torch.equal(q.to(torch.float32).abs().reshape(4, 3, 128).amax(-1), torch.full((4, 3), fmt.max))


def test_all_zero_tile_gives_finite_scale_and_zeros():
    x = torch.randn(4, 384)
    x[1, 128:256] = 0.0
    q, s = quantize_tiles(x)
    assert torch.isfinite(s).all() and s[1, 1] == pytest.approx(AMAX_FLOOR / 448)
    assert (q[1, 128:256].to(torch.float32) == 0).all()
    w = torch.zeros(256, 256)
    wq, ws = quantize_blocks(w)
    assert torch.isfinite(ws).all() and (wq.to(torch.float32) == 0).all()
    assert (dequantize(wq, ws) == 0).all()


def test_nan_stays_inside_its_tile():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 512, generator=g)
    clean_q, clean_s = quantize_tiles(x)
    x[2, 300] = math.nan  # tile (2, 2)
    q, s = quantize_tiles(x)
    deq = dequantize(q, s)
    nan_pos = torch.isnan(deq)
    assert nan_pos[2, 300]
    outside = torch.ones_like(nan_pos)
    outside[2, 256:384] = False
    assert not nan_pos[outside].any(), "a NaN leaked out of its 1x128 tile"
    assert torch.equal(codes_u8(q)[outside], codes_u8(clean_q)[outside])
    # the 128x128 block recipe confines it to its block
    w = torch.randn(256, 256, generator=g)
    w[5, 5] = math.nan
    wd = dequantize(*quantize_blocks(w))
    assert not torch.isnan(wd[128:]).any() and not torch.isnan(wd[:, 128:]).any()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_requantising_a_dequantised_tensor_is_bit_identical(fmt):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 640, generator=g) * 10 ** torch.empty(64, 1).uniform_(-3, 3, generator=g)
    q, s = quantize_tiles(x, fmt)
    q2, s2 = quantize_tiles(dequantize(q, s), fmt)
    assert torch.equal(codes_u8(q), codes_u8(q2))
    assert_close(s2, s, rtol=2**-22, atol=0, name="re-derived scales")  # equal up to one float32 ulp
    w = torch.randn(256, 384, generator=g)
    wq, ws = quantize_blocks(w, fmt)
    wq2, _ = quantize_blocks(dequantize(wq, ws), fmt)
    assert torch.equal(codes_u8(wq), codes_u8(wq2))


def test_dequantisation_error_is_within_half_an_ulp():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1024, generator=g) * 3
    q, s = quantize_tiles(x)
    deq = dequantize(q, s)
    S = fp8.expand_scale(s, tuple(x.shape))
    # relative half-ulp of E4M3 in the normal range, absolute half-step in the subnormal range
    bound = torch.maximum(x.abs() * 2.0**-4, S * E4M3.min_subnormal / 2) * (1 + 1e-6)
    assert ((deq - x).abs() <= bound).all()
    assert sqnr_db(x, deq) > 30.0  # 3 mantissa bits: ~31.5 dB on Gaussian data


def test_per_tile_sqnr_beats_per_tensor_with_outliers():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 1024, generator=g)
    outlier = torch.rand(x.shape, generator=g) < 1e-3
    x = torch.where(outlier, x * 1e5, x)
    sq = {gr: sqnr_db(x, dequantize(*quantize(x, gr)), mask=~outlier) for gr in ("tensor", "row", "tile")}
    # measured (seed 6): tensor ~8 dB, row ~18 dB, tile ~26 dB
    assert sq["tile"] > sq["tensor"] + 12, sq
    assert sq["tile"] > sq["row"] > sq["tensor"], sq


# ----------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize(
    "ga,gb",
    [("tile", "block"), ("tile", "tile"), ("block", "tile"), ("row", "row"), ("tensor", "tensor")],
)
def test_emulated_gemm_equals_dequantise_then_matmul(ga, gb):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(200, 640, generator=g)
    b = torch.randn(136, 640, generator=g)
    aq, as_ = quantize(a, ga)
    bq, bs = quantize(b, gb)
    y = scaled_matmul_emulated(aq, as_, bq, bs)
    ref = dequantize(aq, as_).double() @ dequantize(bq, bs).double().t()
    # float32 re-association only: measured 3e-7 of max |y|
    assert_close(y, ref.float(), atol=1e-5 * float(ref.abs().max()), rtol=0, name=f"{ga} x {gb} GEMM")


def test_gemm_scale_shape_errors_name_expected_shape():
    a = quantize_tiles(torch.randn(4, 256))
    expect_raises(lambda: scaled_matmul_emulated(a[0], a[1][:, :1].repeat(1, 3), a[0], a[1]), ValueError, ["(4, 2)"])
    expect_raises(lambda: scaled_matmul_emulated(a[0], a[1], torch.zeros(4, 128), a[1]), ValueError, ["(N, K)"])


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_scaled_mm_layouts_on_cpu(recipe):
    """torch._scaled_mm runs tensor- and row-wise scaling on CPU too: the GPU path's layouts, checked here."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(64, 256, generator=g), torch.randn(96, 256, generator=g)
    aq, as_ = fp8._quantize_operand(a, recipe, "a")
    bq, bs = fp8._quantize_operand(b, recipe, "b")
    y = scaled_matmul_cuda(aq, as_, bq, bs, out_dtype=torch.float32)
    ref = scaled_matmul_emulated(aq, as_, bq, bs)
    assert_close(y, ref, atol=1e-5 * float(ref.abs().max()), rtol=0, name=f"_scaled_mm {recipe}")


def test_cpu_dispatch_is_emulated():
    a = quantize_tiles(torch.randn(16, 256))
    b = quantize_blocks(torch.randn(128, 256))
    assert torch.equal(scaled_matmul(*a, *b), scaled_matmul_emulated(*a, *b))
    assert fp8.auto_recipe("cpu") == "blockwise"
    expect_raises(lambda: scaled_matmul(*a, *b, backend="tpu"), ValueError, ["backend"])


# ----------------------------------------------------------------------------- accumulation precision


def test_round_to_bits():
    x = torch.tensor([1 + 2**-10, 1 + 3 * 2**-11, -(1 + 2**-10)])
    assert round_to_bits(x, 10, "nearest").tolist() == [1 + 2**-10, 1 + 2**-9, -(1 + 2**-10)]
    assert round_to_bits(x, 9, "truncate").tolist() == [1.0, 1.0, -1.0]
    assert round_to_bits(torch.tensor([1 + 3 * 2**-10, -(1 + 3 * 2**-10)]), 9, "truncate").tolist() == [1 + 2**-9, -(1 + 2**-9)]
    y = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(round_to_bits(y.float(), 23, "nearest"), y.float())
    f32 = torch.randn(1000)
    assert torch.equal(round_to_bits(f32, 12, "truncate"), round_to_bits(f32.double(), 12, "truncate").float())


def test_limited_accumulation_error_grows_with_k_and_promotion_fixes_it():
    g = torch.Generator().manual_seed(9)
    errs, errs_promoted = [], []
    for K in (256, 1024, 4096):
        a = round_to_format(torch.randn(8, K, generator=g) * 4)
        b = round_to_format(torch.randn(8, K, generator=g) * 4)
        ref = a.double() @ b.double().t()
        denom = a.abs().double() @ b.abs().double().t()
        errs.append(float(((accumulate_limited(a, b, 14) - ref).abs() / denom).max()))
        errs_promoted.append(float(((accumulate_limited(a, b, 14, promote_every=128) - ref).abs() / denom).max()))
    assert errs[0] < errs[1] < errs[2], errs
    assert errs[2] > 10 * errs_promoted[2], (errs, errs_promoted)  # measured ~1.6e-3 vs ~1.2e-5
    assert max(errs_promoted) < 1e-4
    # a full-precision accumulator is a plain float32 sum
    a = round_to_format(torch.randn(4, 300, generator=g))
    b = round_to_format(torch.randn(5, 300, generator=g))
    full = accumulate_limited(a, b, 23, mode="nearest")
    assert_close(full, (a.double() @ b.double().t()).float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- FP8 linear


@pytest.mark.parametrize("shape", [(256, 256, 384), (2, 100, 130, 70)])
def test_fp8_linear_grads_close_to_fp32(shape):
    *lead, K, N = shape
    g = torch.Generator().manual_seed(10)
    x = torch.randn(*lead, K, generator=g).requires_grad_()
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).requires_grad_()
    gy = torch.randn(*lead, N, generator=g)
    y = fp8_linear(x, w)
    y.backward(gy)
    dx, dw = x.grad, w.grad
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (x32 @ w32.t()).backward(gy)

    def rel(a, b):
        return float((a.detach() - b.detach()).norm() / b.detach().norm())

    # measured: y 3.7 %, dx 3.7 %, dW 4.4 % (two quantised operands, E4M3 SQNR ~31.5 dB each)
    assert rel(y, x32 @ w32.t()) < 0.05
    assert rel(dx, x32.grad) < 0.05
    assert rel(dw, w32.grad) < 0.06
    assert dw.dtype == torch.float32 and y.shape == (*lead, N)


def test_fp8_linear_backward_is_the_documented_gemms():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, 256, generator=g).requires_grad_()
    w = torch.randn(384, 256, generator=g).requires_grad_()
    gy = torch.randn(256, 384, generator=g)
    fp8_linear(x, w, recipe="blockwise").backward(gy)
    wq, ws = quantize_blocks(w.detach())
    # Dgrad: dy in 1x128 tiles along N times W's blocks transposed
    dx = scaled_matmul_emulated(*quantize_tiles(gy), wq.t(), ws.t())
    assert_close(x.grad, dx, atol=1e-6 * float(dx.abs().max()), rtol=0, name="Dgrad")
    # Wgrad: dy^T and the cached FP8 activation, both in 1x128 tiles along the tokens
    xd = dequantize(*quantize_tiles(x.detach()))
    dw = scaled_matmul_emulated(*quantize_tiles(gy.t()), *quantize_tiles(xd.t()))
    assert_close(w.grad, dw, atol=1e-6 * float(dw.abs().max()), rtol=0, name="Wgrad")


def test_fp8_linear_module_trains_and_keeps_fp32_master_weights():
    torch.manual_seed(12)
    teacher = torch.randn(128, 256) / 16
    layer = FP8Linear(256, 128)
    assert layer.weight.dtype == torch.float32
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        x = torch.randn(128, 256)
        loss = (layer(x) - x @ teacher.t()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    y = layer(torch.randn(2, 128, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 128, 128)
    lin = torch.nn.Linear(256, 128, bias=False)
    assert torch.equal(FP8Linear.from_linear(lin).weight, lin.weight)
    expect_raises(lambda: FP8Linear.from_linear(torch.nn.Linear(4, 4)), ValueError, ["bias"])


# ----------------------------------------------------------------------------- loss scaling


def run_scaler_pattern(pattern, growth_interval):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.0)
    ref = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    ours = DynamicLossScaler(growth_interval=growth_interval)
    traj_ref, traj_ours = [], []
    for bad in pattern:
        factor = math.inf if bad else 1.0
        opt.zero_grad()
        ref.scale(p.sum() * factor).backward()
        ref.step(opt)
        ref.update()
        traj_ref.append(ref.get_scale())
        p.grad = None
        ours.scale(p.sum() * factor).backward()
        found = ours.unscale_([p])
        assert found == bool(bad)
        ours.update(found)
        traj_ours.append(ours.scale_value)
    return traj_ref, traj_ours


def test_loss_scaler_matches_grad_scaler_trajectory():
    pattern = [0] * 5 + [1] + [0] * 3 + [1, 1] + [0] * 7 + [1] + [0] * 4
    ref, ours = run_scaler_pattern(pattern, growth_interval=3)
    assert ours == ref
    assert max(ours) > 2.0**16 and min(ours) < 2.0**16  # it grew and it backed off


def test_loss_scaler_defaults_and_growth_after_2000_steps():
    s = DynamicLossScaler()
    assert (s.scale_value, s.growth_factor, s.backoff_factor, s.growth_interval) == (2.0**16, 2.0, 0.5, 2000)
    s.update(True)
    assert s.scale_value == 2.0**15
    for _ in range(1999):
        s.update(False)
    assert s.scale_value == 2.0**15
    s.update(False)
    assert s.scale_value == 2.0**16, "loss scale never grows back"


def test_bytes_per_element():
    assert bytes_per_element("fp32") == 4 and bytes_per_element("bf16") == 2
    assert bytes_per_element("e4m3", "tile") == 1 + 4 / 128
    assert bytes_per_element("e4m3", "block") == 1 + 4 / 128**2


# ----------------------------------------------------------------------------- GPU path


@needs_fp8_gpu
def test_cuda_recipes_probe_and_auto_recipe():
    recipes = fp8.cuda_recipes(0)
    assert "tensorwise" in recipes, recipes
    assert fp8.auto_recipe("cuda") in recipes


@needs_fp8_gpu
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_scaled_mm_matches_emulation_on_gpu(recipe):
    if recipe not in fp8.cuda_recipes(0):
        pytest.skip(f"{recipe} scaling not supported by this torch/GPU")
    g = torch.Generator(device="cuda").manual_seed(13)
    a = torch.randn(256, 1024, device="cuda", generator=g)
    b = torch.randn(512, 1024, device="cuda", generator=g)
    aq, as_ = fp8._quantize_operand(a, recipe, "a")
    bq, bs = fp8._quantize_operand(b, recipe, "b")
    y = scaled_matmul(aq, as_, bq, bs, out_dtype=torch.float32, backend="cuda")
    ref = scaled_matmul_emulated(aq, as_, bq, bs)
    # bf16 output rounding: <= 2^-8 relative
    assert_close(y, ref, atol=2**-8 * float(ref.abs().max()), rtol=2**-8, name=f"_scaled_mm {recipe} vs emulation")


@needs_fp8_gpu
def test_fp8_linear_gpu_matches_emulation():
    recipe = fp8.auto_recipe("cuda")
    g = torch.Generator(device="cuda").manual_seed(14)
    x = torch.randn(256, 512, device="cuda", generator=g).requires_grad_()
    w = torch.randn(256, 512, device="cuda", generator=g).requires_grad_()
    gy = torch.randn(256, 256, device="cuda", generator=g)
    y = fp8_linear(x, w, recipe=recipe)
    y.backward(gy)
    xe, we = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ye = fp8_linear(xe, we, recipe=recipe, backend="emulated")
    ye.backward(gy)
    for got, want, name in ((y, ye, "y"), (x.grad, xe.grad, "dx"), (w.grad, we.grad, "dW")):
        assert_close(got, want, atol=2**-7 * float(want.abs().max()), rtol=2**-7, name=f"GPU FP8 linear {name}")


def _fused_on_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    from course_lib.deepseek import fp8_fused

    return fp8_fused.supports(torch.empty(1, device="cuda"))


@pytest.mark.skipif(not _fused_on_gpu(), reason="needs CUDA and compiled Triton (tests/test_fp8_fused.py covers the CPU interpreter)")
def test_fused_quantisers_bit_equal_to_emulation_on_gpu():
    """The compiled kernels (correctly rounded division) give the emulation's codes and scales on the GPU too."""
    from course_lib.deepseek import fp8_fused

    g = torch.Generator(device="cuda").manual_seed(15)
    x = torch.randn(300, 1000, device="cuda", generator=g) * torch.logspace(-3, 3, 1000, device="cuda")
    x[0] = 0.0
    x[1, :128] = 1e-9
    x[2, 3] = float("inf")
    xq, xs = quantize_tiles(x)
    cases = {"tiles": (fp8_fused.quantize_tiles_fused(x), (xq, xs)),
             "tiles bf16 x^T": (fp8_fused.quantize_tiles_fused(x.bfloat16().t()), quantize_tiles(x.bfloat16().t())),
             "blocks": (fp8_fused.quantize_blocks_fused(x), quantize_blocks(x)),
             "re-tiled x^T": (fp8_fused.requantize_tiles_t_fused(xq, xs), quantize_tiles(fp8.dequantize(xq, xs).t()))}
    for name, ((gq, gs), (wq, ws)) in cases.items():
        assert int(fp8_fused.code_differences(gq, wq).sum()) == 0, f"{name}: codes differ from the emulation"
        torch.testing.assert_close(gs, ws, rtol=0, atol=0, equal_nan=True)


def test_one_scale_convention_in_every_notebook_and_module():
    """DeepSeek's convention everywhere: scale = amax / 448 is stored, x / scale is cast, x_q * scale is the value back.

    A scale written the other way round (448 / amax, fmt.max / amax) may appear only where a text names it as the
    reciprocal mistake.
    """
    import re

    from conftest import ROOT

    inverse = re.compile(r"(448|f(mt)?\.max|\bmax)\s*/\s*(\\max|amax|float\(\w+\.abs\(\)\.max|\w+\.abs\(\)\.(a)?max)")
    files = sorted((ROOT / "notebooks").glob("*.py")) + sorted((ROOT / "course_lib").rglob("*.py"))
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if inverse.search(line) and "reciprocal" not in line]
    assert not found, "a scale written as its reciprocal (448/amax) where the course stores amax/448:\n" + "\n".join(found)
