"""Given building blocks of Section 2's attention layers: the MLA configuration, the KV caches, input checks.

Nothing here computes attention: these are the containers and conventions the course *gives* (Section 2's
notebook imports them), while the attention layers themselves, the learner's exercises, live in
:mod:`course_lib.deepseek.mla` (which re-exports everything below, so ``from course_lib.deepseek.mla
import MLAConfig, LatentKVCache`` keeps working).

- ``MLAConfig``: MLA's dimensions (``MLAConfig.v3()`` is DeepSeek-V3's, from ``course_lib.deepseek.v3``), with
  ``qk_head_dim`` = d_h + d_h^R, ``softmax_scale`` = 1/sqrt(d_h + d_h^R) (times YaRN's mscale^2 when YaRN is active)
  and the cache sizes per token (``latent_cache_elements_per_token`` = d_c + d_h^R = 576 at V3,
  ``full_cache_elements_per_token`` = H (d_h + d_h^R + d_v) = 40960 at V3).
- Context length and RoPE scaling, DeepSeek's ``inference/model.py`` semantics: beyond ``original_seq_len`` (4096)
  a model needs a choice, ``rope_scaling="yarn"`` (DeepSeek-V3: rotary frequencies rescaled with ``rope_factor``,
  ``beta_fast``, ``beta_slow``; softmax scale times ``(0.1 * mscale * ln(rope_factor) + 1)^2``) or ``"none"`` (plain
  RoPE, extrapolated). ``max_seq_len > original_seq_len`` without a choice is a ``ValueError``. As in DeepSeek's code,
  YaRN is active only when ``max_seq_len > original_seq_len`` (``cfg.yarn``); at or below it nothing changes.
- ``LatentKVCache``: the absorbed path's cache, the normalised latent ``c_kv`` (B, S, d_c) and the roped
  shared key ``k_pe`` (B, S, d_h^R). ``KVCache``: per-head keys (B, S, H, d_k) and values (B, S, H, d_v).
  Both are pre-allocated; ``update(start_pos, a, b)`` writes a chunk and returns views of ``[0, start_pos + T)``.
- ``check_input(x, dim, start_pos, max_seq_len)``: a ``ValueError`` naming the expected shape.
- ``mha_cache_elements_per_token(H, d)`` = 2 H d; ``HF_NAMES``: course/DeepSeek parameter names -> HF's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from course_lib.deepseek.v3 import preset

__all__ = [
    "MLAConfig",
    "LatentKVCache",
    "KVCache",
    "check_input",
    "mha_cache_elements_per_token",
    "HF_NAMES",
]

#: course/DeepSeek parameter prefix -> HF transformers ``DeepseekV3Attention`` prefix.
HF_NAMES = {
    "wq": "q_proj",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}


@dataclass
class MLAConfig:
    """MLA dimensions. The defaults are a small test size; ``MLAConfig.v3()`` is DeepSeek-V3 (671B)."""

    dim: int = 128
    n_heads: int = 4
    q_lora_rank: int = 64  # d_c'; 0 = no query compression (one wq, as in V2-Lite)
    kv_lora_rank: int = 32  # d_c
    qk_nope_head_dim: int = 16  # d_h
    qk_rope_head_dim: int = 8  # d_h^R
    v_head_dim: int = 16
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # context extension (DeepSeek's ModelArgs names and defaults); see the module docstring
    original_seq_len: int = 4096  # the pre-training context; beyond it a rope scaling must be chosen
    rope_scaling: str | None = None  # None (not chosen), "none" (plain RoPE) or "yarn" (DeepSeek-V3)
    rope_factor: float = 40.0  # YaRN's s: the slowest frequencies are divided by it
    beta_fast: int = 32  # YaRN's correction range: frequencies turning more than beta_fast times keep their value
    beta_slow: int = 1  # ... and those turning less than beta_slow times over original_seq_len are divided
    mscale: float = 1.0  # softmax scale *= (0.1 * mscale * ln(rope_factor) + 1)^2 when YaRN is active

    def __post_init__(self) -> None:
        if self.rope_scaling not in (None, "none", "yarn"):
            raise ValueError(f"rope_scaling must be None, 'none' or 'yarn', got {self.rope_scaling!r}")
        if self.max_seq_len > self.original_seq_len and self.rope_scaling is None:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} exceeds original_seq_len={self.original_seq_len}: choose "
                "rope_scaling='yarn' (DeepSeek-V3's context extension) or rope_scaling='none' (plain RoPE, extrapolated)")
        if self.rope_scaling == "yarn" and not (self.rope_factor > 1 and self.beta_fast > self.beta_slow > 0):
            raise ValueError(f"YaRN needs rope_factor > 1 and beta_fast > beta_slow > 0, got {self.rope_factor}, "
                             f"{self.beta_fast}, {self.beta_slow}")

    @classmethod
    def v3(cls, max_seq_len: int = 4096) -> MLAConfig:
        """DeepSeek-V3's attention (``course_lib.deepseek.v3.V3``), with YaRN chosen as in the released model.

        YaRN is active only for ``max_seq_len > 4096``: DeepSeek's ``generate.py`` runs at 16384
        (``course_lib.deepseek.v3.SERVING_SEQ_LEN``), where the softmax scale is 1.874 / sqrt(192).
        """
        return cls(**preset(cls, max_seq_len=max_seq_len, rope_scaling="yarn"))

    @property
    def yarn(self) -> bool:
        """YaRN is active: chosen, and ``max_seq_len > original_seq_len`` (DeepSeek's ``inference/model.py``)."""
        return self.rope_scaling == "yarn" and self.max_seq_len > self.original_seq_len

    @property
    def yarn_mscale(self) -> float:
        """``0.1 * mscale * ln(rope_factor) + 1`` when YaRN is active (1.3689 at V3), else 1."""
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0 if self.yarn else 1.0

    def rope_frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The (qk_rope_head_dim / 2,) rotary frequencies in float64: YaRN's when active, else ``theta^(-2i/d)``."""
        from course_lib.deepseek.common import rope_frequencies, yarn_frequencies

        d = self.qk_rope_head_dim
        if self.yarn:
            return yarn_frequencies(d, self.rope_theta, self.rope_factor, self.beta_fast, self.beta_slow,
                                    self.original_seq_len, device=device)
        return rope_frequencies(d, self.rope_theta, device=device)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width ``d_h + d_h^R`` (192 in V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``1/sqrt(d_h + d_h^R)`` (1/sqrt(192) in V3), times ``yarn_mscale^2`` when YaRN is active (1.874 at V3)."""
        return self.qk_head_dim ** -0.5 * self.yarn_mscale ** 2

    @property
    def latent_cache_elements_per_token(self) -> int:
        """Elements the absorbed/latent cache holds per token per layer: ``d_c + d_h^R`` (576 in V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def full_cache_elements_per_token(self) -> int:
        """Elements a naive MLA cache of per-head K and V holds: ``H (d_h + d_h^R + d_v)`` (40960 in V3)."""
        return self.n_heads * (self.qk_head_dim + self.v_head_dim)


def mha_cache_elements_per_token(n_heads: int, head_dim: int) -> int:
    """Standard MHA caches K and V for every head: ``2 H d`` (32768 for 128 heads of 128)."""
    return 2 * n_heads * head_dim


class _Cache:
    """Pre-allocated per-layer cache; positions ``[0, length)`` are valid."""

    batch: int
    max_seq_len: int
    length: int

    def _check_write(self, start_pos: int, B: int, T: int) -> int:
        end = start_pos + T
        if B > self.batch:
            raise ValueError(f"batch {B} exceeds the cache's batch size {self.batch}")
        if start_pos < 0 or start_pos > self.length:
            raise ValueError(f"start_pos {start_pos} would leave a hole: the cache holds positions [0, {self.length})")
        if end > self.max_seq_len:
            raise ValueError(f"positions up to {end} exceed the cache's max_seq_len {self.max_seq_len}")
        return end

    def tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def elements_per_token(self) -> int:
        return sum(t[0, 0].numel() for t in self.tensors())

    @property
    def nbytes(self) -> int:
        """Bytes allocated (all ``max_seq_len`` slots, whole batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies."""
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors())


class LatentKVCache(_Cache):
    """MLA's cache: the normalised latent ``c_kv`` (B, S, d_c) and the roped shared ``k_pe`` (B, S, d_h^R).

    ``d_c + d_h^R`` elements per token per layer (576 in V3). Use ``device="meta"`` to size a cache
    without allocating it.
    """

    def __init__(self, batch: int, max_seq_len: int, kv_lora_rank: int, qk_rope_head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.batch, self.max_seq_len, self.length = batch, max_seq_len, 0
        self.c_kv = torch.zeros(batch, max_seq_len, kv_lora_rank, dtype=dtype, device=device)  # (B, S, d_c)
        self.k_pe = torch.zeros(batch, max_seq_len, qk_rope_head_dim, dtype=dtype, device=device)  # (B, S, d_r)

    @classmethod
    def for_config(cls, cfg: MLAConfig, batch: int, max_seq_len: int | None = None, **kw) -> LatentKVCache:
        return cls(batch, max_seq_len or cfg.max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, **kw)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.c_kv, self.k_pe)

    def update(self, start_pos: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``c_kv`` (B, T, d_c) and ``k_pe`` (B, T, d_h^R) at positions ``[start_pos, start_pos + T)``.

        Returns views of all valid positions ``[0, start_pos + T)``: (B, S, d_c) and (B, S, d_h^R).
        """
        B, T = c_kv.shape[:2]
        if c_kv.shape[2:] != self.c_kv.shape[2:] or k_pe.shape != (B, T, self.k_pe.shape[-1]):
            raise ValueError(
                f"expected c_kv (B, T, {self.c_kv.shape[-1]}) and k_pe (B, T, {self.k_pe.shape[-1]}), "
                f"got {tuple(c_kv.shape)} and {tuple(k_pe.shape)}"
            )
        end = self._check_write(start_pos, B, T)
        self.c_kv[:B, start_pos:end] = c_kv
        self.k_pe[:B, start_pos:end] = k_pe
        self.length = end
        return self.c_kv[:B, :end], self.k_pe[:B, :end]


class KVCache(_Cache):
    """Standard cache of per-head keys ``k`` (B, S, H, d_k) and values ``v`` (B, S, H, d_v)."""

    def __init__(self, batch: int, max_seq_len: int, n_heads: int, k_dim: int, v_dim: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.batch, self.max_seq_len, self.length = batch, max_seq_len, 0
        self.k = torch.zeros(batch, max_seq_len, n_heads, k_dim, dtype=dtype, device=device)  # (B, S, H, d_k)
        self.v = torch.zeros(batch, max_seq_len, n_heads, v_dim or k_dim, dtype=dtype, device=device)  # (B, S, H, d_v)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k, self.v)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k`` (B, T, H, d_k), ``v`` (B, T, H, d_v) at ``[start_pos, start_pos + T)``; return views of ``[0, end)``."""
        B, T = k.shape[:2]
        if k.shape[2:] != self.k.shape[2:] or v.shape != (B, T) + tuple(self.v.shape[2:]):
            raise ValueError(
                f"expected k (B, T, {', '.join(map(str, self.k.shape[2:]))}) and v (B, T, "
                f"{', '.join(map(str, self.v.shape[2:]))}), got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        end = self._check_write(start_pos, B, T)
        self.k[:B, start_pos:end] = k
        self.v[:B, start_pos:end] = v
        self.length = end
        return self.k[:B, :end], self.v[:B, :end]


def check_input(x: torch.Tensor, dim: int, start_pos: int = 0, max_seq_len: int | None = None) -> None:
    """Raise ``ValueError`` naming the expected shape unless ``x`` is (B, T, dim) and fits in ``max_seq_len``."""
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, T, {dim}), got {tuple(x.shape)}")
    if max_seq_len is not None and start_pos + x.shape[1] > max_seq_len:
        raise ValueError(f"positions up to {start_pos + x.shape[1]} exceed max_seq_len {max_seq_len}")
