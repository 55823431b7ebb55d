"""Building blocks shared by every DeepSeek-V3 part: RMSNorm, rotary embeddings, the SwiGLU MLP.

RoPE layout: DeepSeek-V3's inference code rotates *interleaved* pairs ``(x[2i], x[2i+1])`` as one
complex number; HF transformers reproduces the same scores with ``rope_interleave=True``. The course
uses the interleaved layout throughout.
"""

from __future__ import annotations

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


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angles ``positions[:, None] * theta^(-2i/dim)``, shape (T, dim/2)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return (positions.to(torch.float64)[:, None] * inv_freq[None, :]).to(dtype)


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
