"""Drafts built from switches: what the course's test-writing exercises share.

A test-writing exercise asks the learner for a test that passes every correct implementation of a contract
and raises ``AssertionError`` for a wrong one. Its judge runs that test on drafts built in the learner's
kernel from plain switches (data only crosses the channel, never code): a factory ``make_x(**switches)``
gives one draft, :func:`build_all` many in one round trip, and :func:`choice` validates a switch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["build_all", "choice"]

T = TypeVar("T")


def build_all(make: Callable[..., T], specs: Sequence[dict]) -> list[T]:
    """``make(**s)`` for each switch set ``s``."""
    return [make(**s) for s in specs]


def choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; a ``ValueError`` naming the switch otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value
