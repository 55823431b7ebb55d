"""Drafts of ``kv_cache_bytes``, correct and wrong, built from plain switches (Section 1's test-writing exercise).

Section 1 asks for ``test_kv_cache_bytes(fn)``: a check that passes every correct implementation of the KV-cache
size formula and raises ``AssertionError`` for a wrong one. Try a test on drafts built here (the judge builds
the same drafts on its own side and hands the kernel stand-ins)::

    make_kv_cache_bytes(**switches) -> fn(n_layers, n_kv_heads, head_dim, seq_len, batch=1, bytes_per_elem=2)

With no switch the draft is correct: ``2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem``,
a Python int. Each switch plants one mistake (``factor=1``, ``use_batch=False``, ``default_batch=2``,
``default_bytes=4``, ``bits=True``, ``as_float=True``, ``extra_tokens=1``, ``layers_for_heads=True``) or writes
the right formula another way (``style="prod"``, ``"loop"``, ``"float"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from course_lib.drafts import choice

__all__ = ["make_kv_cache_bytes"]

_LOOP_LAYERS = 10_000  # the loop draft adds this many layers one at a time, the rest in one step (same sum)


def make_kv_cache_bytes(*, factor: int = 2, use_batch: bool = True, default_batch: int = 1, default_bytes: int = 2,
                        bits: bool = False, as_float: bool = False, extra_tokens: int = 0, layers_for_heads: bool = False,
                        style: str = "formula") -> Callable[..., int | float]:
    """One draft of ``kv_cache_bytes``; see the module docstring for the switches."""
    choice("style", style, ("formula", "prod", "loop", "float"))

    def kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch=default_batch, bytes_per_elem=default_bytes):
        heads = n_layers if layers_for_heads else n_kv_heads
        terms = (n_layers, heads, head_dim, seq_len + extra_tokens, batch if use_batch else 1, bytes_per_elem)
        if style == "prod":
            n = factor * math.prod(terms)
        elif style == "loop":
            per_layer = factor * math.prod(terms[1:])
            n = 0
            for _ in range(min(n_layers, _LOOP_LAYERS)):
                n += per_layer
            n += per_layer * max(0, n_layers - _LOOP_LAYERS)
        elif style == "float":
            n = int(float(factor) * math.prod(float(v) for v in terms))  # exact below 2^53
        else:
            n = factor * terms[0] * terms[1] * terms[2] * terms[3] * terms[4] * terms[5]
        n = n * 8 if bits else n
        return float(n) if as_float else n

    return kv_cache_bytes

