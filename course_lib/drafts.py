"""Drafts for the course's test-writing exercises: built from switches to try a test on, stand-ins while grading.

A test-writing exercise asks the learner for a test that passes every correct implementation of a contract
and raises ``AssertionError`` for a wrong one. To try a test, a learner builds drafts with a factory
``make_x(**switches)`` (:func:`choice` validates a switch).

While grading, the drafts stay on the judge's side. The kernel gets stand-ins, one per test call
(:func:`run_test`): a function, or a module class whose ``forward`` runs remotely, that sends each call's
arguments to the judge's draft server over a socket in the kernel's private folder and returns what the draft
computed there. A stand-in holds only a random token and what any implementation shows from outside (its
signature, its layers), so nothing in the kernel says which draft is which or how it was built.
"""

from __future__ import annotations

import inspect
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from course_lib import wire

__all__ = ["choice", "run_test", "stand_ins"]

MAX_MESSAGE = 64 << 20  # bytes of one request or answer
# What a draft raised comes back as the same built-in exception (anything else as RuntimeError).
_RAISES = {e.__name__: e for e in (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError,
                                   OverflowError, AttributeError, NotImplementedError, AssertionError)}


def choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; a ``ValueError`` naming the switch otherwise."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def send_message(sock: socket.socket, data: bytes) -> None:
    """One message: its length (8 bytes, little-endian), then the bytes."""
    sock.sendall(struct.pack("<Q", len(data)) + data)


def recv_message(sock: socket.socket, limit: int = MAX_MESSAGE) -> bytes | None:
    """The next message, or None when the other side closed the connection or announced more than ``limit`` bytes."""
    head = _recv_exactly(sock, 8)
    if head is None:
        return None
    (n,) = struct.unpack("<Q", head)
    return None if n > limit else _recv_exactly(sock, n)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class _Line:
    """The kernel's end of the draft server: one request, one answer."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None

    def ask(self, request: dict) -> Any:
        try:
            data = wire.dumps(request)
        except wire.WireError as e:
            raise TypeError(f"a draft takes numbers, tensors and containers of them ({e})") from None
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.path)
            send_message(self.sock, data)
            raw = recv_message(self.sock)
        except BaseException:  # an interrupt mid-answer would leave the answer behind for the next call
            self.close()
            raise
        if raw is None:
            self.close()
            raise RuntimeError("the judge's draft server closed the connection")
        reply = wire.loads(raw, max_bytes=MAX_MESSAGE + 1)
        if "error" in reply:
            err = reply["error"]
            raise _RAISES.get(str(err.get("type")), RuntimeError)(str(err.get("message", "")))
        return reply["ok"]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _signature(params: list) -> inspect.Signature:
    """An ``inspect.Signature`` from ``[name, kind, default or absent]`` triples."""
    out = []
    for name, kind, *default in params:
        d = default[0] if default else inspect.Parameter.empty
        out.append(inspect.Parameter(name, getattr(inspect.Parameter, kind), default=d))
    return inspect.Signature(out)


def _function(line: _Line, spec: dict) -> Callable:
    token = spec["token"]

    def draft(*args: Any, **kwargs: Any) -> Any:
        return line.ask({"op": "call", "token": token, "args": list(args), "kwargs": kwargs})

    draft.__name__ = draft.__qualname__ = str(spec["name"])
    draft.__signature__ = _signature(spec["params"])  # type: ignore[attr-defined]
    return draft


def _module_class(line: _Line, spec: dict) -> type:
    """A module class whose layers are built here and whose forward (and backward) the judge computes."""
    import torch
    from torch import nn

    token, init = spec["token"], _signature(spec["params"])

    class _Remote(torch.autograd.Function):
        @staticmethod
        def forward(ctx, args, names, x, *params):  # type: ignore[override]
            ctx.save_for_backward(x, *params)
            ctx.meta = (args, names)
            return line.ask({"op": "forward", "token": token, "init": args, "params": dict(zip(names, params)), "x": x})

        @staticmethod
        def backward(ctx, grad_out):  # type: ignore[override]
            x, *params = ctx.saved_tensors
            args, names = ctx.meta
            gx, gp = line.ask({"op": "backward", "token": token, "init": args, "params": dict(zip(names, params)),
                               "x": x, "grad_out": grad_out})
            return (None, None, gx, *(gp.get(n) for n in names))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        bound = init.bind(*args, **kwargs)
        bound.apply_defaults()
        self._draft_args = list(bound.args)
        size = bound.arguments
        for name, (fan_in, fan_out, bias) in spec["linears"].items():
            setattr(self, name, nn.Linear(size[fan_in], size[fan_out], bias=bias))

    def forward(self, x: Any) -> Any:
        named = list(self.named_parameters())
        names, params = [n for n, _ in named], [p for _, p in named]
        if not isinstance(x, torch.Tensor):
            return line.ask({"op": "forward", "token": token, "init": self._draft_args, "params": dict(zip(names, params)),
                             "x": x})
        return _Remote.apply(self._draft_args, names, x, *params)

    __init__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                                *init.parameters.values()])  # type: ignore[attr-defined]
    return type(str(spec["name"]), (nn.Module,), {"__init__": __init__, "forward": forward})


def _stand_in(line: _Line, spec: dict) -> Any:
    return _function(line, spec) if spec["kind"] == "function" else _module_class(line, spec)


def stand_ins(path: str, specs: list[dict]) -> list:
    """The kernel's stand-ins for the drafts the judge's server at ``path`` holds, one per spec."""
    line = _Line(path)
    return [_stand_in(line, s) for s in specs]


def run_test(test: Callable, path: str, spec: dict) -> None:
    """The judge's request for one draft: build its stand-in and run ``test`` on it (what it raises is the verdict).

    The server answers a draft only while its own test runs, so a stand-in kept from an earlier call answers
    nothing later: a test cannot sort the drafts by comparing them with one another.
    """
    line = _Line(path)
    try:
        test(_stand_in(line, spec))
    finally:
        line.close()
