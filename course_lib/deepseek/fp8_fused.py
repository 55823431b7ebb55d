"""Fused FP8 quantisers: DeepSeek's 1x128 activation tiles and 128x128 weight blocks in one Triton kernel each.

The plain-torch quantisers of :mod:`course_lib.deepseek.fp8` make several passes over the tensor (abs, amax,
divide, clamp, cast), which on a GPU costs more than the FP8 GEMM saves. These kernels read the input once
and write the E4M3 codes and the scales, with exactly the arithmetic of the emulation::

    scale = max(amax, 1e-4) / 448          code = e4m3(clamp(x / scale, -448, 448))   (round to nearest even)

- ``quantize_tiles_fused(x)``: ``x`` (..., K) of any float dtype and any strides (a transposed view such as
  ``g.t()`` is read in place) -> ``(x_q (..., K) float8_e4m3fn, scale (..., ceil(K/128)) float32)``;
- ``quantize_blocks_fused(w)``: ``w`` (N, K) -> ``(w_q, scale (ceil(N/128), ceil(K/128)))``;
- ``requantize_tiles_t_fused(x_q, x_s)``: the cached FP8 activation re-tiled for Wgrad, i.e.
  ``quantize_tiles(dequantize(x_q, x_s).t())`` without materialising the FP32 tensor.

The E4M3 code is computed with integer operations on the float32 bits (no FP8 cast instruction), so the
kernels give the same codes under Triton's CPU interpreter, which the tests use, as on a GPU. The one
place a GPU may differ from the CPU is the division: ``precise=True`` (default) uses the correctly rounded
``div_rn``; ``precise=False`` Triton's default ``/``, which may be off by one ulp (``tools/gpu_check.py``
measures how often a code then differs from the emulation). NaN and inf follow the emulation: a NaN makes
its whole tile NaN (the scale too), an inf gives an inf scale, NaN at the inf and signed zeros elsewhere.

On CPU tensors the kernels run in Triton's interpreter (slow: tests and small shapes only); without Triton
``available()`` is False and callers keep the plain-torch path.
"""

from __future__ import annotations

import math
import os
import sys
from functools import cache

import torch

from course_lib.deepseek.fp8_formats import E4M3, TILE

__all__ = [
    "available", "enable_interpreter", "interpreted", "supports", "code_differences",
    "quantize_tiles_fused", "quantize_blocks_fused", "requantize_tiles_t_fused",
]

_ROWS = 16  # rows of 1x128 tiles per program
_BLOCK_SLICE = 32  # rows of a 128x128 block read at a time
_ROWS_T = 64  # ... when the rows are contiguous in memory (x.t() of a row-major x): 64 consecutive elements per column


def _triton_module():
    try:
        import triton
    except ImportError:
        return None
    return triton


def enable_interpreter() -> bool:
    """Run the kernels in Triton's CPU interpreter (tests, CPU-only machines); True when it is active.

    Triton reads ``TRITON_INTERPRET`` when it decorates a jit function (its own ``tl.max`` etc. are jit
    functions too, decorated when ``triton`` is imported) and again on some later calls, so this sets
    ``TRITON_INTERPRET=1`` for the rest of the process and must run before anything imports ``triton``.
    Returns False when Triton is missing or was already imported in compiled mode.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreted()


def interpreted() -> bool:
    """True when Triton is imported and runs kernels in its interpreter (CPU tensors), False otherwise."""
    if _triton_module() is None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.max, InterpretedFunction)


def available() -> bool:
    """True when Triton is installed (imports it)."""
    return _triton_module() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the fused kernels can quantise ``x``: a float tensor on CUDA with compiled Triton, or on CPU
    with the interpreter enabled (``enable_interpreter()``)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or not available():
        return False
    return x.is_cuda if not interpreted() else x.device.type == "cpu"


@cache
def _kernel():
    """The jit (or, in interpreter mode, interpreted) quantisation kernel of ``fp8_triton.py``."""
    from course_lib.deepseek import fp8_triton

    return fp8_triton.quant_kernel


def code_differences(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Mask of the E4M3 codes of ``got`` that differ from ``want``, any NaN code matching any other.

    NaN is 0x7F with the sign of the float32 NaN it came from, and that sign follows the hardware's NaN
    propagation (x86's default NaN is negative, CUDA's positive), so it is not part of the recipe.
    """
    a, b = got.view(torch.uint8), want.view(torch.uint8)
    return (a != b) & ~(((a & 0x7F) == 0x7F) & ((b & 0x7F) == 0x7F))


def _check(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if not supports(x):
        mode = "not installed" if not available() else ("in interpreter mode" if interpreted() else "compiled")
        raise RuntimeError(f"the fused FP8 quantisers cannot run on {x.device} with Triton {mode}: CUDA tensors need "
                           "compiled Triton, CPU tensors its interpreter (fp8_fused.enable_interpreter() before importing triton)")


def _launch(x, xs, R, C, x_strides, xs_strides, in_tiles, blocks: bool, precise: bool, q, s) -> None:
    kernel = _kernel()
    if blocks:
        br, bc = TILE, TILE
    else:  # a column-major input (a transposed view) is read along its rows: take more of them per program
        br, bc = (_ROWS_T if x_strides[0] == 1 and R > 1 else _ROWS), TILE
    grid = (math.ceil(R / br), math.ceil(C / bc))
    if grid[0] == 0 or grid[1] == 0:
        return
    qu = q.view(torch.uint8)
    reach = max((R - 1) * abs(x_strides[0]) + (C - 1) * abs(x_strides[1]), q.numel())
    if reach >= 2**31:
        raise ValueError(f"fused quantisers index with 32-bit offsets: a ({R}, {C}) operand reaches element {reach}")
    kernel[grid](x, xs if xs is not None else s, qu, s, R, C, *x_strides, *xs_strides, qu.stride(0), qu.stride(1),
                 s.stride(0), s.stride(1), BLOCKS=blocks, IN_CODES=xs is not None, IN_TR=in_tiles[0], IN_TC=in_tiles[1],
                 PRECISE=precise, BR=br, BC=bc, SUB=_BLOCK_SLICE)


def quantize_tiles_fused(x: torch.Tensor, precise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_tiles(x)`` (E4M3, 1x128 tiles along the last dimension) in one kernel; same codes and scales."""
    _check(x, "x")
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # a view where possible (e.g. g.t() stays strided)
    M = x2.shape[0]
    KB = math.ceil(K / TILE)
    q = torch.empty((M, K), dtype=E4M3.torch_dtype, device=x.device)
    s = torch.empty((M, KB), dtype=torch.float32, device=x.device)
    _launch(x2, None, M, K, x2.stride(), (0, 0), (1, 1), False, precise, q, s)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], KB)


def quantize_blocks_fused(w: torch.Tensor, precise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_blocks(w)`` (E4M3, 128x128 blocks of a 2-D (N, K) weight) in one kernel; same codes and scales."""
    _check(w, "w")
    if w.dim() != 2:
        raise ValueError(f"block quantisation expects a 2-D (N, K) weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    q = torch.empty((N, K), dtype=E4M3.torch_dtype, device=w.device)
    s = torch.empty((math.ceil(N / TILE), math.ceil(K / TILE)), dtype=torch.float32, device=w.device)
    _launch(w, None, N, K, w.stride(), (0, 0), (1, 1), True, precise, q, s)
    return q, s


def requantize_tiles_t_fused(x_q: torch.Tensor, x_s: torch.Tensor, precise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_tiles(dequantize(x_q, x_s).t())`` for an E4M3 (M, K) ``x_q`` with 1x128 scales ``x_s`` (M, ceil(K/128)).

    The Wgrad operand: the FP8 activation cached by Fprop, re-tiled along the token dimension M.
    Returns ``(q (K, M), scale (K, ceil(M/128)))``.
    """
    if x_q.dtype != E4M3.torch_dtype or x_q.dim() != 2:
        raise ValueError(f"x_q must be a 2-D float8_e4m3fn tensor, got {x_q.dtype} of shape {tuple(x_q.shape)}")
    M, K = x_q.shape
    if tuple(x_s.shape) != (M, math.ceil(K / TILE)):
        raise ValueError(f"x_s must have shape {(M, math.ceil(K / TILE))} (one scale per 1x128 tile), got {tuple(x_s.shape)}")
    _check(x_s, "x_s")
    xs = x_s.to(torch.float32)
    q = torch.empty((K, M), dtype=E4M3.torch_dtype, device=x_q.device)
    s = torch.empty((K, math.ceil(M / TILE)), dtype=torch.float32, device=x_q.device)
    codes = x_q.view(torch.uint8)
    # logical (R, C) = (K, M): element (k, m) is codes[m, k] with scale xs[m, k // 128]
    _launch(codes, xs, K, M, (codes.stride(1), codes.stride(0)), (xs.stride(1), xs.stride(0)), (TILE, 1), False, precise, q, s)
    return q, s
