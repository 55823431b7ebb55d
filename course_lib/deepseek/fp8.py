"""FP8 mixed-precision training as in DeepSeek-V3 (technical report, section 3.3), emulated in plain torch.

The compact reference (the answers of Section 4's exercises) used by its judges, Section 5 and ``tools/gpu_check.py``;
the given formats, constants and helpers live in :mod:`course_lib.deepseek.fp8_formats` and are re-exported here.

Formats (OCP FP8, as ``torch.float8_e4m3fn`` and ``torch.float8_e5m2``)::

    E4M3: 1 sign, 4 exponent bits (bias 7),  3 mantissa bits, max 448,   min normal 2^-6,  min subnormal 2^-9,  no inf
    E5M2: 1 sign, 5 exponent bits (bias 15), 2 mantissa bits, max 57344, min normal 2^-14, min subnormal 2^-16, +-inf

    value = (-1)^s * 2^(e - bias) * (1 + m / 2^M)     for exponent field e > 0   (normal)
    value = (-1)^s * 2^(1 - bias) * (m / 2^M)         for e == 0                 (subnormal)

    E4M3 has no infinities: its only special codes are NaN (S.1111.111); E5M2 keeps IEEE's all-ones
    exponent for inf (m == 0) and NaN (m != 0).

DeepSeek-V3's recipe: E4M3 for every GEMM input (Fprop, Dgrad and Wgrad), online ("current") scaling,
activations quantised per 1x128 tile, weights per 128x128 block, with

    scale = max(amax, 1e-4) / 448          x_q = cast_e4m3(clamp(x / scale, -448, 448))        x ~ x_q * scale

(``scale`` is the *dequantisation* factor: multiply to get the value back). The GEMM multiplies FP8 tiles,
and every N_C = 128 products the partial sum is scaled by ``scale_a * scale_b`` and promoted to an FP32
accumulator: the tensor cores keep only ~14 bits while they accumulate. Embedding, output head, MoE gate,
norms and attention stay in BF16/FP32; master weights and gradients are FP32.

Interface::

    encode(x, E4M3) -> uint8 codes      decode(codes, E4M3) -> float32     (bit level, round-to-nearest-even)
    cast_to_fp8(x, E4M3)                clamp, then torch's float8 cast
    quantize_tensorwise(x) / quantize_rowwise(x) / quantize_tiles(x) / quantize_blocks(w) -> (x_q, scale)
    dequantize(x_q, scale)              any of the four scale layouts
    scaled_matmul(a_q, a_s, b_q, b_s)   a @ b^T from quantised operands: torch._scaled_mm on FP8 GPUs, else emulated
    accumulate_limited(a, b, mantissa_bits=14, promote_every=128)     the accumulation-precision experiment
    FP8Linear(in_features, out_features)                              Fprop/Dgrad/Wgrad on FP8 inputs, weight quantised once per step
    set_fused_quantisers("auto" | "always" | "never")                 the blockwise quantisers as Triton kernels (fp8_fused)
    DynamicLossScaler()                 the fp16 loss scaler, same trajectory as torch.amp.GradScaler

GPU path: on CUDA devices with compute capability >= 8.9, ``scaled_matmul`` calls ``torch._scaled_mm``
with DeepSeek's block-wise scaling (A scales 1x128 as an (M, K/128) column-major tensor, B scales
128x128 as (K/128, N/128) column-major) where the installed torch and GPU support it (Hopper, cuBLASLt
>= 12.9); ``auto_recipe()`` otherwise falls back to row-wise, then tensor-wise scaling.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

# The given building blocks (formats, constants, SQNR, the accumulator's rounding) live in fp8_formats, which the
# learner's kernel may import; they are re-exported here so every importer of this module keeps working.
from course_lib.deepseek.fp8_formats import (  # noqa: F401 - re-exported
    AMAX_FLOOR,
    E4M3,
    E5M2,
    FORMATS,
    N_C,
    TILE,
    FP8Format,
    decode,
    get_format,
    round_to_bits,
    sqnr_db,
)

__all__ = [
    "FP8Format",
    "E4M3",
    "E5M2",
    "FORMATS",
    "get_format",
    "TILE",
    "AMAX_FLOOR",
    "N_C",
    "encode",
    "decode",
    "all_codes",
    "round_to_format",
    "cast_to_fp8",
    "compute_scale",
    "quantize_tensorwise",
    "quantize_rowwise",
    "quantize_tiles",
    "quantize_blocks",
    "quantize",
    "dequantize",
    "expand_scale",
    "sqnr_db",
    "scaled_matmul",
    "scaled_matmul_emulated",
    "scaled_matmul_cuda",
    "scaled_mm_args",
    "CUDA_FALLBACKS",
    "round_to_bits",
    "accumulate_limited",
    "RECIPES",
    "auto_recipe",
    "cuda_recipes",
    "fp8_linear",
    "FP8LinearFunction",
    "FP8Linear",
    "set_fused_quantisers",
    "DynamicLossScaler",
    "bytes_per_element",
]


# ----------------------------------------------------------------------------- bit level


def encode(x: torch.Tensor, fmt: FP8Format | str = E4M3, saturate: bool = True) -> torch.Tensor:
    """The 8-bit codes (uint8) of ``x`` rounded to the nearest ``fmt`` value, ties to even mantissa.

    ``saturate=True`` clamps to +-max first (inf too), as DeepSeek's recipe does before every cast;
    ``saturate=False`` rounds and turns magnitudes beyond max into inf (E5M2) or NaN (E4M3, which has
    no inf). NaN keeps its sign: code ``0x7F`` or ``0xFF``. Inputs are read exactly in float64, so
    float32/bf16/fp16 inputs are rounded once, like torch's casts.
    """
    fmt = get_format(fmt)
    x = x.detach().to(torch.float64)
    sign = torch.signbit(x).to(torch.int64)
    a = x.abs()
    if saturate:
        a = a.clamp(max=fmt.max)  # inf -> max; NaN stays NaN
    # Binade exponent floor(log2 a), never below the subnormals' exponent 1 - bias.
    _, e = torch.frexp(a)  # a = f * 2^e with f in [0.5, 1)
    e = (e.to(torch.int64) - 1).clamp(min=fmt.min_exp)
    quantum = torch.ldexp(torch.ones_like(a), (e - fmt.man_bits).to(torch.float64))  # spacing of the binade
    q = torch.round(a / quantum) * quantum  # torch.round: half to even; exact in float64
    finite = torch.isfinite(q) & (q <= fmt.max)
    # Bits of q (rounding may have carried into the next binade, so recompute its exponent).
    _, e_q = torch.frexp(torch.where(finite, q, torch.zeros_like(q)))
    e_q = e_q.to(torch.int64) - 1
    is_normal = q >= fmt.min_normal
    exp_field = torch.where(is_normal, e_q + fmt.bias, torch.zeros_like(e_q))
    mant = torch.where(
        is_normal,
        (torch.ldexp(q, (-e_q).to(torch.float64)) - 1.0) * 2**fmt.man_bits,
        q / fmt.min_subnormal,
    )
    mant = torch.where(finite, mant, torch.zeros_like(mant)).round().to(torch.int64)
    code = (sign << 7) | (exp_field.clamp(min=0) << fmt.man_bits) | mant
    overflow_code = fmt.inf_code if fmt.has_inf else fmt.nan_code
    code = torch.where(finite, code, (sign << 7) | overflow_code)
    code = torch.where(torch.isnan(x), (sign << 7) | fmt.nan_code, code)
    return code.to(torch.uint8)


def all_codes() -> torch.Tensor:
    """The 256 codes 0..255 as uint8."""
    return torch.arange(256, dtype=torch.int64).to(torch.uint8)


def round_to_format(x: torch.Tensor, fmt: FP8Format | str = E4M3, saturate: bool = True) -> torch.Tensor:
    """``x`` rounded to the nearest representable ``fmt`` value (float32), via the bit-level codec."""
    return decode(encode(x, fmt, saturate), fmt).reshape(x.shape)


def cast_to_fp8(x: torch.Tensor, fmt: FP8Format | str = E4M3) -> torch.Tensor:
    """Clamp to +-max, then cast with torch (whose overflow behaviour differs between versions)."""
    fmt = get_format(fmt)
    return x.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype)


# ----------------------------------------------------------------------------- scaled quantisation


def compute_scale(amax: torch.Tensor, fmt: FP8Format | str = E4M3) -> torch.Tensor:
    """Dequantisation scale ``max(amax, 1e-4) / fmt.max``: the block's largest magnitude lands on fmt.max.

    NaN in ``amax`` propagates (a NaN stays inside its own block).
    """
    fmt = get_format(fmt)
    return amax.to(torch.float32).clamp_min(AMAX_FLOOR) / fmt.max


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def quantize_tensorwise(
    x: torch.Tensor, fmt: FP8Format | str = E4M3, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: returns ``(x_q, scale)`` with ``scale`` a 0-dim float32 tensor.

    Pass ``scale`` to reuse a precomputed one (delayed scaling): values beyond the range then saturate.
    """
    fmt = get_format(fmt)
    _check_float(x, "x")
    xf = x.to(torch.float32)
    s = compute_scale(xf.abs().amax(), fmt) if scale is None else torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return cast_to_fp8(xf / s, fmt), s


def quantize_rowwise(x: torch.Tensor, fmt: FP8Format | str = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of a (M, K) tensor: returns ``(x_q, scale)`` with ``scale`` of shape (M, 1)."""
    fmt = get_format(fmt)
    _check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"row-wise quantisation expects a 2-D (M, K) tensor, got shape {tuple(x.shape)}")
    xf = x.to(torch.float32)
    s = compute_scale(xf.abs().amax(dim=1, keepdim=True), fmt)  # (M, 1)
    return cast_to_fp8(xf / s, fmt), s


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_tiles(x: torch.Tensor, fmt: FP8Format | str = E4M3, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile scaling along the last dimension (DeepSeek's 1x128 activation tiles).

    ``x``: (..., K). Returns ``x_q`` (..., K) in ``fmt`` and ``scale`` (..., ceil(K / tile)) float32; a
    ragged last tile is treated as if zero-padded.
    """
    fmt = get_format(fmt)
    _check_float(x, "x")
    K = x.shape[-1]
    xp = _pad_last(x.to(torch.float32), tile)
    xt = xp.reshape(*x.shape[:-1], -1, tile)  # (..., K/tile, tile)
    s = compute_scale(xt.abs().amax(dim=-1), fmt)  # (..., K/tile)
    q = cast_to_fp8(xt / s.unsqueeze(-1), fmt).reshape(xp.shape)[..., :K]  # (..., K)
    return q, s


def quantize_blocks(w: torch.Tensor, fmt: FP8Format | str = E4M3, block: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scaling of a 2-D (N, K) weight (DeepSeek's 128x128 blocks).

    Returns ``w_q`` (N, K) in ``fmt`` and ``scale`` (ceil(N / block), ceil(K / block)) float32.
    """
    fmt = get_format(fmt)
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"block quantisation expects a 2-D (N, K) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    wp = _pad_last(_pad_last(w.to(torch.float32), block).t(), block).t()  # (N', K') padded with zeros
    NB, KB = wp.shape[0] // block, wp.shape[1] // block
    wb = wp.reshape(NB, block, KB, block)  # (NB, block, KB, block)
    s = compute_scale(wb.abs().amax(dim=(1, 3)), fmt)  # (NB, KB)
    q = cast_to_fp8(wb / s[:, None, :, None], fmt).reshape(wp.shape)[:N, :K]  # (N, K)
    return q, s


def quantize(
    x: torch.Tensor, granularity: str = "tile", fmt: FP8Format | str = E4M3, tile: int = TILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``granularity`` in {"tensor", "row", "tile", "block"}."""
    if granularity == "tensor":
        return quantize_tensorwise(x, fmt)
    if granularity == "row":
        return quantize_rowwise(x, fmt)
    if granularity == "tile":
        return quantize_tiles(x, fmt, tile)
    if granularity == "block":
        return quantize_blocks(x, fmt, tile)
    raise ValueError(f"granularity must be 'tensor', 'row', 'tile' or 'block', got {granularity!r}")


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], block: int = TILE) -> torch.Tensor:
    """Broadcast a scale to one value per element of a tensor of ``shape``.

    Accepts every layout the quantisers produce: a single value, (M, 1) per row, (..., ceil(K/block))
    per 1xblock tile, or (ceil(N/block), ceil(K/block)) per block of a 2-D tensor.
    """
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(()).expand(shape)
    K = shape[-1]
    KB = math.ceil(K / block)
    if scale.shape == tuple(shape[:-1]) + (1,):  # per row
        return scale.expand(shape)
    if scale.shape == tuple(shape[:-1]) + (KB,):  # per 1xblock tile
        return scale.repeat_interleave(block, dim=-1)[..., :K]
    if len(shape) == 2 and scale.shape == (math.ceil(shape[0] / block), KB):  # per block x block
        return scale.repeat_interleave(block, dim=0)[: shape[0]].repeat_interleave(block, dim=1)[:, :K]
    raise ValueError(
        f"scale of shape {tuple(scale.shape)} does not fit a tensor of shape {tuple(shape)}: expected (), "
        f"{tuple(shape[:-1]) + (1,)}, {tuple(shape[:-1]) + (KB,)}"
        + (f" or ({math.ceil(shape[0] / block)}, {KB})" if len(shape) == 2 else "")
    )


def dequantize(x_q: torch.Tensor, scale: torch.Tensor, block: int = TILE) -> torch.Tensor:
    """``x_q * scale`` in float32, the scale broadcast over its tile, row or block."""
    return x_q.to(torch.float32) * expand_scale(scale, tuple(x_q.shape), block)


# ----------------------------------------------------------------------------- GEMM


def _scale_rows_kblocks(scale: torch.Tensor, rows: int, K: int, block: int) -> torch.Tensor:
    """A GEMM operand's scale as one value per (row, k-block): (rows, ceil(K / block)).

    Valid inputs: tensor-wise (one value), row-wise (rows, 1), 1xblock tiles (rows, KB) or
    block x block (ceil(rows / block), KB).
    """
    KB = math.ceil(K / block)
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, KB)
    if s.dim() == 2 and s.shape == (rows, 1):
        return s.expand(rows, KB)
    if s.dim() == 2 and s.shape == (rows, KB):
        return s
    if s.dim() == 2 and s.shape == (math.ceil(rows / block), KB):
        return s.repeat_interleave(block, dim=0)[:rows]
    raise ValueError(
        f"scale of shape {tuple(s.shape)} does not fit an operand of shape ({rows}, {K}): expected (), "
        f"({rows}, 1), ({rows}, {KB}) or ({math.ceil(rows / block)}, {KB})"
    )


def scaled_matmul_emulated(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block: int = TILE,
) -> torch.Tensor:
    """``a @ b^T`` from FP8 operands, the way DeepSeek's kernel does it, in plain torch.

    ``a_q``: (M, K), ``b_q``: (N, K), both FP8 (or any float holding FP8 values); scales in any layout
    of ``_scale_rows_kblocks``. For every K-block ``k`` (of ``block`` = N_C = 128 elements)::

        y += (a_q[:, k] @ b_q[:, k]^T) * a_s[:, k, None] * b_s[None, :, k]          (FP32 accumulator)

    i.e. the partial products of one block are summed at FP8-product precision, then dequantised with
    the two scales and promoted to FP32 (DeepSeek-V3 section 3.3.2, figure 7b).
    """
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"expected a_q (M, K) and b_q (N, K), got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    M, K = a_q.shape
    N = b_q.shape[0]
    sa = _scale_rows_kblocks(a_s, M, K, block)  # (M, KB)
    sb = _scale_rows_kblocks(b_s, N, K, block)  # (N, KB)
    a = a_q.to(torch.float32)
    b = b_q.to(torch.float32)
    y = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for k in range(sa.shape[1]):
        sl = slice(k * block, min(K, (k + 1) * block))
        partial = a[:, sl] @ b[:, sl].t()  # (M, N): products of FP8 values, summed within one block
        y += partial * sa[:, k, None] * sb[None, :, k]  # dequantise and promote
    return y.to(out_dtype)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


def scaled_mm_args(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operands and scales of ``a @ b^T`` laid out as ``torch._scaled_mm`` (cuBLASLt) wants them.

    ``a_q`` (M, K) row-major and ``b_q`` (N, K) row-major (so ``b_q.t()`` is the column-major (K, N)
    second operand). Scale layouts: tensor-wise (one value each), row-wise ((M, 1), (N, 1)), or
    DeepSeek's block-wise: ``a_s`` (M, K/128) per 1x128 tile (passed column-major) with ``b_s``
    (N/128, K/128) per 128x128 block (passed as its transpose, (K/128, N/128) column-major) or
    (N, K/128) per 1x128 tile (passed as (K/128, N) row-major). Returns ``(a, b_t, scale_a, scale_b)``.
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    a_q = a_q.contiguous()
    b_t = b_q.contiguous().t()  # (K, N) column-major
    a_s = a_s.to(torch.float32)
    b_s = b_s.to(torch.float32)
    if a_s.numel() == 1 and b_s.numel() == 1:
        sa, sb = a_s.reshape(()), b_s.reshape(())
    elif a_s.shape == (M, 1) and b_s.shape == (N, 1):
        sa, sb = a_s.contiguous(), b_s.reshape(1, N).contiguous()
    elif a_s.shape == (M, math.ceil(K / TILE)):
        sa = _col_major(a_s)  # (M, K/128), strides (1, M)
        if b_s.shape == (math.ceil(N / TILE), math.ceil(K / TILE)):
            sb = b_s.contiguous().t()  # (K/128, N/128), strides (1, K/128)
        elif b_s.shape == (N, math.ceil(K / TILE)):
            sb = _col_major(b_s).t()  # (K/128, N), strides (N, 1)
        else:
            raise ValueError(f"b_s of shape {tuple(b_s.shape)} does not match a block-wise a_s {tuple(a_s.shape)}")
    else:
        raise ValueError(f"unsupported scale layout for _scaled_mm: a_s {tuple(a_s.shape)}, b_s {tuple(b_s.shape)}")
    return a_q, b_t, sa, sb


def scaled_matmul_cuda(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``a @ b^T`` through ``torch._scaled_mm`` (FP8 tensor cores); layouts as in ``scaled_mm_args``."""
    a, b_t, sa, sb = scaled_mm_args(a_q, a_s, b_q, b_s)
    return torch._scaled_mm(a, b_t, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


RECIPES = ("blockwise", "rowwise", "tensorwise")


def _shape_ok(recipe: str, M: int, N: int, K: int) -> bool:
    """Shapes torch._scaled_mm accepts for ``recipe`` (block-wise also needs 16-byte aligned scale rows)."""
    if M % 16 or N % 16 or K % 16:
        return False
    if recipe == "blockwise":
        return K % (4 * TILE) == 0 and N % TILE == 0
    return True


@cache
def cuda_recipes(device_index: int = 0) -> tuple[str, ...]:
    """The scaling recipes ``torch._scaled_mm`` runs on this CUDA device, each checked by a small probe."""
    if not torch.cuda.is_available():
        return ()
    if torch.cuda.get_device_capability(device_index) < (8, 9):
        return ()
    dev = torch.device("cuda", device_index)
    gen = torch.Generator(device=dev).manual_seed(0)
    M, N, K = 128, 256, 512
    a = torch.randn(M, K, device=dev, generator=gen)
    b = torch.randn(N, K, device=dev, generator=gen)
    ok = []
    for recipe in RECIPES:
        try:
            aq, as_ = _quantize_operand(a, recipe, "a")
            bq, bs = _quantize_operand(b, recipe, "b")
            y = scaled_matmul_cuda(aq, as_, bq, bs)
            ref = scaled_matmul_emulated(aq, as_, bq, bs)
            if bool(torch.isfinite(y).all()) and float((y.float() - ref).abs().max()) <= 0.02 * float(ref.abs().max()):
                ok.append(recipe)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            continue
    return tuple(ok)


def auto_recipe(device: torch.device | str | None = None) -> str:
    """DeepSeek's block-wise recipe where it runs (CPU emulation, Hopper), else row-wise, else tensor-wise."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return "blockwise"
    supported = cuda_recipes(dev.index or 0)
    for recipe in RECIPES:
        if recipe in supported:
            return recipe
    return "blockwise"  # no FP8 tensor cores: emulate


def scaled_matmul(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``a @ b^T`` from quantised operands: ``torch._scaled_mm`` on FP8 GPUs, the emulation elsewhere.

    ``backend``: "auto" (CUDA when the operands live on a GPU whose probe passed for this scale layout
    and shape), "cuda" (force, errors surface) or "emulated".
    """
    if backend not in ("auto", "cuda", "emulated"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'emulated', got {backend!r}")
    gpu_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if backend == "cuda":
        return scaled_matmul_cuda(a_q, a_s, b_q, b_s, out_dtype=gpu_dtype).to(out_dtype)
    if backend == "auto" and a_q.is_cuda and _cuda_layout_supported(a_q, a_s, b_q, b_s):
        try:
            return scaled_matmul_cuda(a_q, a_s, b_q, b_s, out_dtype=gpu_dtype).to(out_dtype)
        except (RuntimeError, NotImplementedError, ValueError) as e:  # a shape cuBLASLt rejects: emulate, remember why
            CUDA_FALLBACKS[(tuple(a_q.shape), tuple(b_q.shape), tuple(a_s.shape), tuple(b_s.shape))] = f"{type(e).__name__}: {e}"
    return scaled_matmul_emulated(a_q, a_s, b_q, b_s, out_dtype=out_dtype)


CUDA_FALLBACKS: dict[tuple, str] = {}  # shapes that fell back from torch._scaled_mm to the emulation, with the error


def _recipe_of(a_q: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor) -> str | None:
    M, K = a_q.shape
    if a_s.numel() == 1 and b_s.numel() == 1:
        return "tensorwise"
    if a_s.dim() == 2 and a_s.shape == (M, 1):
        return "rowwise"
    if a_s.dim() == 2 and a_s.shape == (M, math.ceil(K / TILE)):
        return "blockwise"
    return None


def _cuda_layout_supported(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor) -> bool:
    if a_q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or b_q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return False
    if a_q.dtype == torch.float8_e5m2 and b_q.dtype == torch.float8_e5m2:
        return False  # cuBLASLt rejects e5m2 x e5m2
    recipe = _recipe_of(a_q, a_s, b_s)
    M, K = a_q.shape
    N = b_q.shape[0]
    if recipe is None or not _shape_ok(recipe, M, N, K):
        return False
    if recipe == "blockwise" and b_s.shape == (N, math.ceil(K / TILE)) and N % TILE:
        return False
    return recipe in cuda_recipes(a_q.device.index or 0)


# ----------------------------------------------------------------------------- accumulation precision


def accumulate_limited(
    a: torch.Tensor,
    b: torch.Tensor,
    mantissa_bits: int = 14,
    promote_every: int | None = None,
    mode: str = "truncate",
) -> torch.Tensor:
    """``a @ b^T`` with an accumulator that keeps only ``mantissa_bits`` bits (Hopper's FP8 MMA: ~14).

    ``a``: (M, K), ``b``: (N, K). Products are exact (FP8 x FP8 fits in FP32); after every addition the
    running sum is rounded to ``mantissa_bits``. With ``promote_every = N_C`` the limited accumulator
    restarts every N_C elements and its partial sum is added to an FP32 accumulator (DeepSeek-V3's
    fix, section 3.3.2). Runs K (or N_C) sequential steps, vectorised over (M, N) and over chunks.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    chunk = K if promote_every is None else promote_every
    pad = (-K) % chunk
    a32 = torch.nn.functional.pad(a.to(torch.float32), (0, pad))
    b32 = torch.nn.functional.pad(b.to(torch.float32), (0, pad))
    C = a32.shape[1] // chunk
    ac = a32.reshape(M, C, chunk)  # (M, C, chunk)
    bc = b32.reshape(N, C, chunk)  # (N, C, chunk)
    acc = torch.zeros(C, M, N, dtype=torch.float32, device=a.device)  # one limited accumulator per chunk
    for i in range(chunk):
        prod = ac[:, :, i].t()[:, :, None] * bc[:, :, i].t()[:, None, :]  # (C, M, N), exact
        acc = round_to_bits(acc + prod, mantissa_bits, mode)
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for c in range(C):  # promotion: FP32 accumulation of the chunks' partial sums
        out += acc[c]
    return out


# ----------------------------------------------------------------------------- FP8 linear layer


FUSED_MODES = ("auto", "always", "never")
_fused_mode = "auto"


def set_fused_quantisers(mode: str) -> str:
    """Where the blockwise recipe's quantisers run as fused Triton kernels (:mod:`course_lib.deepseek.fp8_fused`).

    "auto" (default): CUDA tensors with compiled Triton; "always": wherever the kernels run (CPU too, through
    Triton's interpreter once ``fp8_fused.enable_interpreter()`` is on: slow, for tests); "never": plain torch.
    The kernels give the same codes and scales as the plain-torch quantisers. Returns the previous mode.
    """
    global _fused_mode
    if mode not in FUSED_MODES:
        raise ValueError(f"mode must be one of {FUSED_MODES}, got {mode!r}")
    old, _fused_mode = _fused_mode, mode
    return old


def _use_fused(x: torch.Tensor, fmt: FP8Format | str) -> bool:
    if _fused_mode == "never" or get_format(fmt) is not E4M3 or (_fused_mode == "auto" and not x.is_cuda):
        return False  # checked before importing anything: the CPU path never imports Triton
    from course_lib.deepseek import fp8_fused

    return fp8_fused.supports(x)


def _quantize_operand(x: torch.Tensor, recipe: str, role: str, fmt: FP8Format | str = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a GEMM operand (rows, K) for ``recipe``: role "a" (activations, gradients) or "b" (weights)."""
    if recipe == "tensorwise":
        return quantize_tensorwise(x, fmt)
    if recipe == "rowwise":
        return quantize_rowwise(x, fmt)
    if recipe == "blockwise":
        if _use_fused(x, fmt):
            from course_lib.deepseek import fp8_fused

            return fp8_fused.quantize_tiles_fused(x) if role == "a" else fp8_fused.quantize_blocks_fused(x)
        return quantize_tiles(x, fmt) if role == "a" else quantize_blocks(x, fmt)
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")


def _requantize_activation_t(
    xq: torch.Tensor, xs: torch.Tensor, recipe: str, fmt: FP8Format | str = E4M3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wgrad's x^T operand from the FP8 activation cached by Fprop: dequantise, transpose, re-tile along M."""
    if recipe == "blockwise" and xq.dtype == E4M3.torch_dtype and _use_fused(xs, fmt):
        from course_lib.deepseek import fp8_fused

        return fp8_fused.requantize_tiles_t_fused(xq, xs)
    return _quantize_operand(dequantize(xq, xs).t(), recipe, "a", fmt)  # (K, M), tiles along M


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """A GEMM's output dtype for an activation of ``dtype``: 16-bit activations get 16-bit outputs directly
    (the emulation rounds its FP32 result once either way), anything else FP32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


class FP8LinearFunction(torch.autograd.Function):
    """``y = x W^T`` with all three GEMMs on FP8 inputs (DeepSeek-V3 figure 6).

    Fprop ``y = x W^T``:   x in 1x128 tiles (along K), W in 128x128 blocks.
    Dgrad ``dx = dy W``:   dy in 1x128 tiles (along N); W's 128x128 blocks, transposed (a block's scale
                           does not care about the direction, so no re-quantisation is needed).
    Wgrad ``dW = dy^T x``: both re-quantised in 1x128 tiles along the token dimension M (DeepSeek turns
                           the cached 1x128 activation tiles into 128x1 tiles for this GEMM).
    The FP8 activation and weight are what is saved for backward; W and dW stay FP32 (master weights).
    ``weight_q``: the weight already quantised for ``recipe`` as ``(w_q, w_s)`` (``FP8Linear`` quantises
    it once per optimiser step), else it is quantised here.
    """

    @staticmethod
    def forward(ctx, x, weight, recipe="blockwise", fmt="e4m3", grad_fmt="e4m3", backend="auto", weight_q=None):
        K = x.shape[-1]
        N = weight.shape[0]
        x2d = x.reshape(-1, K)  # (M, K)
        xq, xs = _quantize_operand(x2d, recipe, "a", fmt)  # (M, K), scale per tile
        wq, ws = weight_q if weight_q is not None else _quantize_operand(weight, recipe, "b", fmt)  # (N, K), scale per block
        y = scaled_matmul(xq, xs, wq, ws, out_dtype=_out_dtype(x.dtype), backend=backend)  # (M, N)
        ctx.save_for_backward(xq, xs, wq, ws, weight)
        ctx.recipe, ctx.grad_fmt, ctx.backend = recipe, grad_fmt, backend
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], N)  # (..., N)

    @staticmethod
    def backward(ctx, grad_out):
        xq, xs, wq, ws, weight = ctx.saved_tensors
        recipe, gfmt, backend = ctx.recipe, ctx.grad_fmt, ctx.backend
        N, K = weight.shape
        g = grad_out.reshape(-1, N)  # (M, N); the quantisers read it in FP32
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq, gs = _quantize_operand(g, recipe, "a", gfmt)  # (M, N), tiles along N
            if recipe == "blockwise":
                wtq, wts = wq.t(), ws.t()  # (K, N), (K/128, N/128): the same blocks, transposed
            else:
                wtq, wts = _quantize_operand(weight.t(), recipe, "b")  # (K, N)
            grad_x = scaled_matmul(gq, gs, wtq, wts, out_dtype=_out_dtype(ctx.x_dtype), backend=backend)  # (M, K)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gtq, gts = _quantize_operand(g.t(), recipe, "a", gfmt)  # (N, M), tiles along M
            xtq, xts = _requantize_activation_t(xq, xs, recipe)  # (K, M): the cached FP8 activation, tiles along M
            grad_w = scaled_matmul(gtq, gts, xtq, xts, out_dtype=torch.float32, backend=backend)  # (N, K)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    recipe: str = "auto",
    fmt: str = "e4m3",
    grad_fmt: str = "e4m3",
    backend: str = "auto",
) -> torch.Tensor:
    """``x W^T`` with FP8 GEMMs in forward and backward. ``x``: (..., K), ``weight``: (N, K) -> (..., N)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects (N, {weight.shape[1]})")
    if recipe == "auto":
        recipe = auto_recipe(x.device)
    return FP8LinearFunction.apply(x, weight, recipe, fmt, grad_fmt, backend)


class FP8Linear(nn.Module):
    """A bias-free linear layer (as all of DeepSeek's) with FP32 master weight and FP8 GEMMs.

    The weight is quantised once per optimiser step, not once per call: the FP8 copy is cached and
    reused while the weight is unchanged (same tensor, same ``_version``: ``optimizer.step()``,
    ``load_state_dict`` and any in-place update bump the version counter and so invalidate it).
    ``invalidate_weight_cache()`` drops it explicitly; ``weight_quantisations`` counts the re-quantisations.
    """

    def __init__(self, in_features: int, out_features: int, recipe: str = "auto", fmt: str = "e4m3", grad_fmt: str = "e4m3") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.recipe, self.fmt, self.grad_fmt = recipe, fmt, grad_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.weight_quantisations = 0
        self._weight_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> FP8Linear:
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias (DeepSeek's linear layers have none)")
        m = cls(linear.in_features, linear.out_features, **kwargs)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
        return m

    def invalidate_weight_cache(self) -> None:
        """Forget the cached FP8 weight (the next forward quantises it again)."""
        self._weight_cache = None

    def quantized_weight(self, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_q, w_s)`` for ``recipe``, from the cache while the weight is unchanged."""
        w = self.weight
        key = (recipe, self.fmt, w.device, w.dtype, w.data_ptr(), tuple(w.shape), w._version)
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.no_grad():
                wq = _quantize_operand(w.detach(), recipe, "b", self.fmt)
            self._weight_cache = (key, wq)
            self.weight_quantisations += 1
        return self._weight_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, weight expects (N, {self.in_features})")
        recipe = auto_recipe(x.device) if self.recipe == "auto" else self.recipe
        return FP8LinearFunction.apply(x, self.weight, recipe, self.fmt, self.grad_fmt, "auto", self.quantized_weight(recipe))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}, fmt={self.fmt}"


# ----------------------------------------------------------------------------- loss scaling


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 training, the same trajectory as ``torch.amp.GradScaler``.

    ``scale`` starts at ``init_scale`` (2^16); a step whose gradients hold inf/NaN is skipped and the
    scale multiplied by ``backoff_factor`` (0.5); after ``growth_interval`` (2000) clean steps in a row
    it is multiplied by ``growth_factor`` (2).

        loss_scaled = scaler.scale(loss); loss_scaled.backward()
        found_inf = scaler.unscale_(params)        # grads /= scale; clip after this
        if not found_inf: optimizer.step()
        scaler.update(found_inf)
    """

    def __init__(
        self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000
    ) -> None:
        self.scale_value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, params) -> bool:
        """Divide every gradient by the scale (in place); return True when any of them holds inf or NaN."""
        inv = torch.tensor(1.0 / self.scale_value, dtype=torch.float64).float()
        found = False
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv.to(p.grad.device))
                found = found or not bool(torch.isfinite(p.grad).all())
        return found

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale_value * self.growth_factor
            if math.isfinite(grown):
                self.scale_value = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker}


# ----------------------------------------------------------------------------- memory


def bytes_per_element(fmt: str, granularity: str | None = None, block: int = TILE) -> float:
    """Storage per element, scales included: "fp32" 4, "bf16"/"fp16" 2, FP8 1 plus one FP32 scale per
    1x``block`` tile (4/block) or per ``block`` x ``block`` block (4/block^2)."""
    base = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "e4m3": 1.0, "e5m2": 1.0, "fp8": 1.0}
    if fmt not in base:
        raise ValueError(f"unknown format {fmt!r}")
    extra = 0.0
    if base[fmt] == 1.0:
        extra = {None: 0.0, "tensor": 0.0, "tile": 4.0 / block, "block": 4.0 / block**2}[granularity]
    return base[fmt] + extra
