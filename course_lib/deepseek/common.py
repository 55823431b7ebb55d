"""Building blocks shared by every DeepSeek-V3 part: RMSNorm, rotary embeddings, the SwiGLU MLP.

RoPE layout: DeepSeek-V3's inference code rotates *interleaved* pairs ``(x[2i], x[2i+1])`` as one
complex number; HF transformers reproduces the same scores with ``rope_interleave=True``. The course
uses the interleaved layout throughout.

Frequencies: ``rope_frequencies(d, theta)`` = ``theta^(-2i/d)``; ``yarn_frequencies`` is DeepSeek-V3's context
extension (``precompute_freqs_cis`` in DeepSeek's ``inference/model.py``): with ``(low, high) =
yarn_correction_range(beta_fast, beta_slow, d, theta, original_seq_len)`` and the linear ramp
``r_i = clamp((i - low) / (high - low), 0, 1)`` over the d/2 pair indices,
``f_i' = f_i / factor * r_i + f_i * (1 - r_i)``: fast frequencies (below ``low``) keep their value, slow ones (above
``high``) are divided by ``factor``, the ramp blends those between. ``rope_angles(..., freqs=...)`` uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (computed in float32 or wider)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(dtype)


def rope_frequencies(dim: int, theta: float = 10000.0, *, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's frequencies ``theta^(-2i/dim)`` for the dim/2 pairs, float64, shape (dim/2,)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {dim}")
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, theta: float, original_seq_len: int) -> tuple[int, int]:
    """The pair indices ``(low, high)`` between which YaRN blends (DeepSeek's ``find_correction_range``).

    Pair ``i`` turns ``original_seq_len * f_i / (2 pi)`` times over the original context; the index where that count
    equals ``n`` is ``dim * ln(original_seq_len / (2 pi n)) / (2 ln theta)``. ``low`` is it for ``beta_fast``
    (rounded down), ``high`` for ``beta_slow`` (rounded up), clamped to ``[0, dim - 1]`` as DeepSeek's code does.
    """

    def index(n_rotations: float) -> float:
        return dim * math.log(original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(index(beta_fast)), 0), min(math.ceil(index(beta_slow)), dim - 1)


def yarn_frequencies(dim: int, theta: float, factor: float, beta_fast: float, beta_slow: float, original_seq_len: int,
                     *, device: torch.device | str | None = None) -> torch.Tensor:
    """YaRN's rotary frequencies (float64, shape (dim/2,)), DeepSeek-V3's ``precompute_freqs_cis`` beyond
    ``original_seq_len``: the module docstring's ramp between ``yarn_correction_range`` with ``factor``."""
    freqs = rope_frequencies(dim, theta, device=device)  # (dim/2,)
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, theta, original_seq_len)
    width = (high - low) if high != low else 0.001  # DeepSeek's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / width).clamp(0, 1)  # 0: keep, 1: divide
    return freqs / factor * ramp + freqs * (1 - ramp)


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32,
                *, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation angles ``positions[:, None] * f_i``, shape (T, dim/2): ``f_i = theta^(-2i/dim)`` unless ``freqs``
    (shape (dim/2,), e.g. ``yarn_frequencies`` or ``MLAConfig.rope_frequencies()``) is given."""
    if freqs is None:
        freqs = rope_frequencies(dim, theta, device=positions.device)
    elif freqs.shape != (dim // 2,) or dim % 2:
        raise ValueError(f"freqs must have shape ({dim // 2},) for an even dim {dim}, got {tuple(freqs.shape)}")
    return (positions.to(torch.float64)[:, None] * freqs.to(device=positions.device, dtype=torch.float64)[None, :]).to(dtype)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dimension of ``x`` by ``angles``.

    ``x``: (B, T, ..., D) with D even; ``angles``: (T, D/2). Pair ``(x[2i], x[2i+1])`` becomes
    ``(x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos)``, i.e. multiplication by ``e^{i angle}``.
    """
    B, T = x.shape[:2]
    D = x.shape[-1]
    if angles.shape != (T, D // 2):
        raise ValueError(f"angles must have shape ({T}, {D // 2}) for x of shape {tuple(x.shape)}, got {tuple(angles.shape)}")
    shape = (1, T) + (1,) * (x.dim() - 3) + (D // 2,)
    cos = angles.cos().to(x.dtype).view(shape)
    sin = angles.sin().to(x.dtype).view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, T, ..., D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, ..., D/2, 2)
    return out.flatten(-2)  # (B, T, ..., D)


class SwiGLU(nn.Module):
    """The DeepSeek MLP and expert: ``w2(silu(w1 x) * w3 x)`` (no biases)."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
