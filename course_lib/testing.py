"""Assertion helpers with learner-friendly diagnostics.

Every helper raises ``AssertionError`` with a message that says what was expected, what came out, where
the largest error sits, and (via ``hint``) which mistake most likely caused it. Visible and hidden
tests in the notebooks use these, so a failing test teaches instead of just saying "False". Each helper
sets ``__tracebackhide__``: a notebook's traceback ends at the learner's line, not inside this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "assert_shape",
    "assert_dtype",
    "assert_close",
    "assert_true",
    "max_errors",
    "gradcheck_fd",
    "copy_weights",
    "compare_modules",
    "expect_raises",
]


def _fmt_shape(shape: Iterable) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _with_hint(msg: str, hint: str | None) -> str:
    return f"{msg}\n  likely cause: {hint}" if hint else msg


def assert_true(cond: bool, msg: str, hint: str | None = None) -> None:
    """``assert cond`` with a message and an optional likely cause."""
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    if not cond:
        raise AssertionError(_with_hint(msg, hint))


def assert_shape(t: torch.Tensor, expected: Sequence[int | None], name: str = "tensor", hint: str | None = None) -> None:
    """Check ``t.shape`` against ``expected``; ``None`` entries match any size."""
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    if not isinstance(t, torch.Tensor):
        raise AssertionError(_with_hint(f"{name} should be a torch.Tensor, got {type(t).__name__}", hint))
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = _fmt_shape("*" if e is None else e for e in expected)
        raise AssertionError(_with_hint(f"{name} has shape {_fmt_shape(t.shape)}, expected {want}", hint))


def assert_dtype(t: torch.Tensor, expected: torch.dtype, name: str = "tensor", hint: str | None = None) -> None:
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    if t.dtype != expected:
        raise AssertionError(_with_hint(f"{name} has dtype {t.dtype}, expected {expected}", hint))


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Max absolute and relative error, and the index where the absolute error peaks."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    diff = (a - e).abs()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    diff = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(diff), diff)
    diff = torch.where(nan_mismatch, torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "where": (), "actual": None, "expected": None}
    flat = int(torch.argmax(torch.nan_to_num(diff, nan=float("inf"))))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    rel = diff / e.abs().clamp_min(1e-12)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(torch.nan_to_num(rel, nan=float("inf")).max()),
        "where": where,
        "actual": float(a[where]) if diff.dim() else float(a),
        "expected": float(e[where]) if diff.dim() else float(e),
    }


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    name: str = "output",
    hint: str | None = None,
    check_dtype: bool = False,
) -> None:
    """Like ``torch.testing.assert_close`` but the message says where and by how much it is wrong.

    Passes when ``|actual - expected| <= atol + rtol * |expected|`` everywhere (NaNs must match).
    """
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(_with_hint(f"{name} should be a torch.Tensor, got {type(actual).__name__}", hint))
    if actual.shape != expected.shape:
        raise AssertionError(
            _with_hint(f"{name} has shape {_fmt_shape(actual.shape)}, expected {_fmt_shape(expected.shape)}", hint)
        )
    if check_dtype and actual.dtype != expected.dtype:
        raise AssertionError(_with_hint(f"{name} has dtype {actual.dtype}, expected {expected.dtype}", hint))
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bool(bad.any()):  # non-finite values first: their cause is never the hint about values
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name} has {int(bad.sum())} NaN/inf entries where finite values are expected (first at index {first})\n"
            "  likely cause: a division by zero, an overflow, a log or sqrt of a non-positive number, or (in attention) "
            "a row whose every entry is masked: look for where the first non-finite value appears")
    both_nan = torch.isnan(a) & torch.isnan(e)
    ok = ((a - e).abs() <= atol + rtol * e.abs()) | both_nan
    ok &= ~(torch.isinf(a) ^ torch.isinf(e)) | both_nan
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    ok |= same_inf
    if bool(ok.all()):
        return
    err = max_errors(actual, expected)
    bad = int((~ok).sum())
    msg = (
        f"{name} differs from the expected values in {bad} of {ok.numel()} entries: "
        f"max abs error {err['max_abs']:.3g}, max rel error {err['max_rel']:.3g} "
        f"(tolerance atol={atol:g}, rtol={rtol:g}); worst at index {err['where']}: "
        f"got {err['actual']:.6g}, expected {err['expected']:.6g}"
    )
    raise AssertionError(_with_hint(msg, hint))


def gradcheck_fd(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    max_entries: int = 64,
    seed: int = 0,
    name: str = "gradient",
    hint: str | None = None,
) -> None:
    """Compare autograd's gradient of ``fn(*inputs).sum()`` with central finite differences in float64.

    Checks up to ``max_entries`` randomly chosen entries per input (all of them for small inputs).
    """
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    gen = torch.Generator().manual_seed(seed)
    xs = [x.detach().to(torch.float64).requires_grad_(x.is_floating_point()) for x in inputs]
    weights = None

    def scalar(*args: torch.Tensor) -> torch.Tensor:
        nonlocal weights
        out = fn(*args)
        if weights is None:
            weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        return (out.to(torch.float64) * weights).sum()

    loss = scalar(*xs)
    grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad], allow_unused=True)
    gi = 0
    for k, x in enumerate(xs):
        if not x.requires_grad:
            continue
        g = grads[gi]
        gi += 1
        g = torch.zeros_like(x) if g is None else g
        n = x.numel()
        idx = torch.randperm(n, generator=gen)[: min(n, max_entries)]
        for i in idx.tolist():
            with torch.no_grad():
                flat = x.view(-1)
                old = float(flat[i])
                flat[i] = old + eps
                up = float(scalar(*xs))
                flat[i] = old - eps
                down = float(scalar(*xs))
                flat[i] = old
            fd = (up - down) / (2 * eps)
            an = float(g.view(-1)[i])
            if abs(an - fd) > atol + rtol * abs(fd):
                pos = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), x.shape))
                raise AssertionError(
                    _with_hint(
                        f"{name} of input {k} at index {pos}: autograd gives {an:.6g}, "
                        f"finite differences give {fd:.6g}",
                        hint,
                    )
                )


def copy_weights(src: nn.Module, dst: nn.Module, mapping: dict[str, str] | None = None) -> None:
    """Copy parameters and buffers from ``src`` into ``dst`` by name (``mapping`` renames src -> dst).

    Raises with the missing or mis-shaped names, so a learner sees which layer is off.
    """
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    mapping = mapping or {}
    src_state = src.state_dict()
    dst_state = dst.state_dict()
    renamed = {mapping.get(k, k): v for k, v in src_state.items()}
    missing = sorted(set(dst_state) - set(renamed))
    if missing:
        raise AssertionError(f"no source weights for {missing}; the module has {sorted(dst_state)}")
    for k, v in dst_state.items():
        if renamed[k].shape != v.shape:
            raise AssertionError(
                f"weight {k!r} has shape {_fmt_shape(v.shape)}, the reference has {_fmt_shape(renamed[k].shape)}"
            )
    dst.load_state_dict({k: renamed[k] for k in dst_state}, strict=True)


def compare_modules(
    module: nn.Module,
    reference: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    mapping: dict[str, str] | None = None,
    atol: float = 1e-10,
    rtol: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    name: str = "output",
    hint: str | None = None,
) -> None:
    """Load the reference's weights into ``module`` and compare their outputs (float64 by default)."""
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    module = module.to(dtype)
    reference = reference.to(dtype)
    copy_weights(reference, module, mapping)
    args = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        got = module(*args)
        want = reference(*args)
    if isinstance(want, tuple):
        got, want = got[0], want[0]
    assert_close(got, want, atol=atol, rtol=rtol, name=name, hint=hint)


def expect_raises(fn: Callable[[], object], exc: type[BaseException], must_mention: Sequence[str] = (), what: str = "") -> None:
    """Check that ``fn()`` raises ``exc`` and that its message mentions each string in ``must_mention``."""
    __tracebackhide__ = True  # IPython (and course_lib.runmodel) hide this helper's frame
    try:
        fn()
    except exc as e:
        text = str(e)
        for s in must_mention:
            if s not in text:
                who = what or "the call"
                raise AssertionError(f"{who} raised {exc.__name__} but its message {text!r} does not mention {s!r}") from e
        return
    raise AssertionError(f"{what or 'the call'} should raise {exc.__name__}")
