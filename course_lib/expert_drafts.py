"""Drafts of Section 3's SwiGLU expert, correct and wrong, built from plain switches (test-writing exercise 3.1).

Section 3 asks for ``test_expert(expert_cls)``: a check that passes every correct expert class and raises
``AssertionError`` for a wrong one. The contract of an expert class::

    expert_cls(dim, inter_dim) -> an nn.Module with nn.Linear layers w1 (dim -> inter_dim, the gate),
    w3 (dim -> inter_dim, the up projection) and w2 (inter_dim -> dim, the down projection), no biases;
    module(x) maps x (..., dim) to the SwiGLU feed-forward output (..., dim) in x's dtype.

Try a test on classes built here (the judge builds the same classes on its own side and hands the kernel
stand-ins)::

    make_expert(**switches) -> a class

With no switch the draft is correct. Some switches write it another way (``style="sigmoid"``: SiLU spelled
z * sigmoid(z); ``"fused"``: one product with w1 and w3 stacked, then split; ``"einsum"``;
``compute="float64"``: computed in float64, cast back), the others plant one mistake (``act``: another
activation; ``hidden``: the activation or the product in the wrong place; ``down=False``: w2 skipped;
``bias=True``; ``cast_back=False``; ``keep_shape=False``: leading dimensions flattened).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.drafts import choice

__all__ = ["make_expert", "is_draft"]

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "none": lambda z: z}
# hidden(g, u, act) for g = w1 x (gate), u = w3 x (up)
_HIDDEN: dict[str, Callable] = {
    "swiglu": lambda g, u, a: a(g) * u,
    "swapped": lambda g, u, a: a(u) * g,  # w1 and w3 trade roles
    "both": lambda g, u, a: a(g) * a(u),
    "of_product": lambda g, u, a: a(g * u),
    "sum": lambda g, u, a: a(g) + u,
    "gate_only": lambda g, u, a: a(g),
}


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, style: str) -> torch.Tensor:
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    if style == "einsum":
        y = torch.einsum("...d,id->...i", x, w)
        return y if b is None else y + b
    return F.linear(x, w, b)


def make_expert(*, style: str = "silu", compute: str = "input", act: str = "silu", hidden: str = "swiglu",
                down: bool = True, bias: bool = False, cast_back: bool = True, keep_shape: bool = True) -> type[nn.Module]:
    """One draft expert class; see the module docstring for the switches."""
    choice("style", style, ("silu", "sigmoid", "fused", "einsum"))
    choice("compute", compute, ("input", "float64"))
    choice("act", act, tuple(_ACTS))
    choice("hidden", hidden, tuple(_HIDDEN))
    activation = (lambda z: z * torch.sigmoid(z)) if (act == "silu" and style == "sigmoid") else _ACTS[act]
    mix = _HIDDEN[hidden]

    class ExpertDraft(nn.Module):
        _course_draft = True

        def __init__(self, dim: int, inter_dim: int) -> None:
            super().__init__()
            self.w1 = nn.Linear(dim, inter_dim, bias=bias)
            self.w2 = nn.Linear(inter_dim, dim, bias=bias)
            self.w3 = nn.Linear(dim, inter_dim, bias=bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.double() if compute == "float64" else x
            if not keep_shape:
                h = h.reshape(-1, h.shape[-1])
            if style == "fused":
                b = None if self.w1.bias is None else torch.cat([self.w1.bias, self.w3.bias])
                g, u = _linear(h, torch.cat([self.w1.weight, self.w3.weight]), b, style).chunk(2, dim=-1)
            else:
                g, u = _linear(h, self.w1.weight, self.w1.bias, style), _linear(h, self.w3.weight, self.w3.bias, style)
            y = mix(g, u, activation)
            if down:
                y = _linear(y, self.w2.weight, self.w2.bias, style)
            return y.to(x.dtype) if cast_back else y

    return ExpertDraft


def is_draft(cls: object) -> bool:
    """Whether ``cls`` (a class or a module) is one of these drafts or derives from one."""
    mro = getattr(cls if isinstance(cls, type) else type(cls), "__mro__", ())
    return any(c.__dict__.get("_course_draft", False) for c in mro)
