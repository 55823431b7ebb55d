"""Helpers Section 4's judges share: names in a learner's bytecode, code comparisons, relative errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from course_judge.checks import assert_close, expect_tensor, matches
from course_judge.session import LearnerError, Remote

BIT_LEVEL_FORBIDDEN = {"float8_e4m3fn", "float8_e5m2", "torch_dtype", "cast_to_fp8", "round_to_format"}


def bytecode_names(k, fn: Remote, limit: int = 64) -> set[str] | None:
    """Global and attribute names the bytecode of the learner's function ``fn`` uses (nested functions included).

    Read in the kernel with ``getattr`` over the channel (code objects stay there as handles, their
    ``co_names`` come back as data); None when the object has no bytecode to read.
    """
    getattr_ = k.lib("builtins:getattr")
    try:
        todo = [getattr_(fn, "__code__")]
    except LearnerError:
        return None
    names: set[str] = set()
    seen = 0
    while todo and seen < limit:
        co = todo.pop()
        seen += 1
        got, consts = k.many([(getattr_, (co, "co_names"), {}), (getattr_, (co, "co_consts"), {})])
        if isinstance(got, (tuple, list)):
            names |= {str(n) for n in got if isinstance(n, str)}
        if isinstance(consts, (tuple, list)):
            for c in consts:
                if isinstance(c, Remote) and k.info(c).get("type") == "code":
                    todo.append(c)
    return names


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance of ``a`` from ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def codes(x: torch.Tensor) -> torch.Tensor:
    """The bytes of an FP8 tensor as int64 (for exact code comparisons)."""
    return x.view(torch.uint8).to(torch.int64) if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else x.to(torch.int64)


def hexes(v) -> list[str]:
    return [hex(int(c)) for c in v]


def how_far(got: torch.Tensor, want: torch.Tensor) -> str:
    """How far ``got`` is from ``want``, ignoring entries that are NaN in both or the same infinity."""
    a, b = got.detach().to(torch.float64), want.detach().to(torch.float64)
    same = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    nonfinite = int((~torch.isfinite(a) & torch.isfinite(b)).sum())
    if nonfinite:
        return f"{nonfinite} NaN/inf entries where finite values are expected"
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return f"{int((diff > 0).sum())} of {a.numel()} entries differ, max abs error {float(diff.max()):.3g}" if a.numel() else "empty"


def close(got, want: torch.Tensor, *, name: str, atol: float, rtol: float = 0.0, mistakes: dict | Callable[[], dict] | None = None,
          hint: str | None = None, nonfinite_hint: str | None = None, mistake_rel: float | None = None) -> None:
    """:func:`course_judge.checks.expect_close` whose messages ignore entries NaN in both, with this section's hints.

    Known mistakes are named first (``mistakes`` may be a function returning them, computed only when
    ``got`` is wrong; ``mistake_rel``: a mistake matches within that fraction of its largest magnitude,
    for outputs whose float32 rounding differs from the judge's float64); then NaN/inf entries where
    finite values are expected (with ``nonfinite_hint``); then the values.
    """
    expect_tensor(got, name, shape=tuple(want.shape))
    if matches(got, want, atol, rtol):
        return
    for what, out in ((mistakes() if callable(mistakes) else mistakes) or {}).items():
        tol = atol if mistake_rel is None or not isinstance(out, torch.Tensor) else mistake_rel * float(out.abs().nan_to_num(0, 0, 0).max())
        if isinstance(out, torch.Tensor) and matches(got, out, max(atol, tol), rtol):
            raise AssertionError(f"{name} differs from the expected values ({how_far(got, want)})\n  likely cause: {what}")
    a, b = got.detach().to(torch.float64), want.detach().to(torch.float64)
    bad = ~torch.isfinite(a) & torch.isfinite(b)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{name} has {int(bad.sum())} NaN/inf entries where finite values are expected (first at index {first})"
                             + (f"\n  likely cause: {nonfinite_hint or hint}" if (nonfinite_hint or hint) else ""))
    assert_close(got, want, atol=atol, rtol=rtol, name=name, hint=hint)


def batch(k, calls: list) -> list:
    """``k.many(calls)`` (one round trip); the first call that raised raises here, as a direct call would."""
    out = k.many(calls)
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out
