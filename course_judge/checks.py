"""Checks judge modules share: comparisons that name the likely mistake.

They raise ``AssertionError`` (a failed part) with a message for the learner. :func:`expect_close`
compares an answer with the expected value and, when they differ, with the outputs of known mistakes
computed by the judge, so the message says *which* mistake the answer makes ("the 1/sqrt(d) scale is
missing") rather than only by how much it is off; otherwise NaN/inf entries are reported before values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from course_lib.testing import assert_close, assert_shape, assert_true

__all__ = ["assert_close", "assert_shape", "assert_true", "expect_close", "expect_tensor", "expect_tuple", "matches",
           "expect_equal", "expect_int", "expect_float"]


def expect_tensor(x: Any, name: str, *, shape: Sequence[int | None] | None = None, dtype: torch.dtype | None = None,
                  hint: str | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise AssertionError(f"{name} should be a torch.Tensor, got {type(x).__name__}" + (f"\n  likely cause: {hint}" if hint else ""))
    if shape is not None:
        assert_shape(x, shape, name, hint=hint)
    if dtype is not None and x.dtype != dtype:
        raise AssertionError(f"{name} has dtype {x.dtype}, expected {dtype}" + (f"\n  likely cause: {hint}" if hint else ""))
    return x


def expect_tuple(x: Any, n: int, name: str) -> tuple:
    if not isinstance(x, (tuple, list)) or len(x) != n:
        got = f"a {type(x).__name__}" + (f" of length {len(x)}" if isinstance(x, (tuple, list)) else "")
        raise AssertionError(f"{name} should return {n} values (a tuple), got {got}")
    return tuple(x)


def expect_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
            return int(x)
        raise AssertionError(f"{name} should be an int, got {type(x).__name__} {x!r:.60}")
    return x


def expect_float(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            return float(x)
        raise AssertionError(f"{name} should be a Python float, got {type(x).__name__}")
    return float(x)


def expect_equal(got: Any, want: Any, name: str, hint: str | None = None) -> None:
    if got != want:
        raise AssertionError(f"{name}: got {got!r:.200}, expected {want!r:.200}" + (f"\n  likely cause: {hint}" if hint else ""))


def matches(got: torch.Tensor, candidate: torch.Tensor, atol: float, rtol: float) -> bool:
    """Does ``got`` equal ``candidate`` within tolerance (same shape, NaNs in the same places)?"""
    if not isinstance(got, torch.Tensor) or not isinstance(candidate, torch.Tensor) or got.shape != candidate.shape:
        return False
    a, b = got.detach().to(torch.float64), candidate.detach().to(torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(b)
    ok = ((a - b).abs() <= atol + rtol * b.abs()) | both_nan | (torch.isinf(a) & torch.isinf(b) & (a == b))
    return bool(ok.all())


def expect_close(got: Any, want: torch.Tensor, *, name: str, atol: float, rtol: float = 0.0,
                 mistakes: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]] | None = None, hint: str | None = None,
                 mistake_rtol: float | None = None) -> None:
    """``assert_close`` that names the mistake whose output ``got`` reproduces (checked most specific first).

    A mistake's output may be given as a function: it is computed only when ``got`` is wrong. ``mistake_rtol``
    (default ``rtol``) is the tolerance for matching a mistake (e.g. looser when the answer runs in float32 and
    the judge simulates the mistake in float64).
    """
    expect_tensor(got, name, shape=tuple(want.shape))
    if matches(got, want, atol, rtol):
        return
    m_rtol = rtol if mistake_rtol is None else mistake_rtol
    for what, out in (mistakes or {}).items():  # the most specific diagnosis first: a known mistake's output
        if callable(out):
            try:
                out = out()
            except Exception:  # noqa: BLE001 - a mistake that cannot be simulated here names nothing
                continue
        if matches(got, out, atol, m_rtol):
            raise AssertionError(f"{name} differs from the expected values ({_how_far(got, want)})\n  likely cause: {what}")
    assert_close(got, want, atol=atol, rtol=rtol, name=name, hint=hint)  # NaN/inf entries are reported first


def _how_far(got: torch.Tensor, want: torch.Tensor) -> str:
    a, b = got.detach().to(torch.float64), want.detach().to(torch.float64)
    nonfinite = int((~torch.isfinite(a) & torch.isfinite(b)).sum())
    if nonfinite:
        return f"{nonfinite} NaN/inf entries where finite values are expected"
    both = torch.isfinite(a) & torch.isfinite(b)
    return f"max abs error {float((a - b)[both].abs().max()):.3g}" if bool(both.any()) else "no finite entries to compare"
