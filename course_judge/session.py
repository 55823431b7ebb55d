"""The judge's view of a learner's notebook: remote references, calls that come back as plain data.

A :class:`Session` talks to one kernel (or, for the mutant suite, one in-process namespace) through a
channel that moves :mod:`course_lib.wire` messages. Judge modules use it like this::

    mla = k.g.MultiHeadLatentAttention(k.lib("course_lib.deepseek.config:MLAConfig")(dim=64, ...))
    y = mla(x, 0)                        # a call: comes back as a plain torch.Tensor
    w = k.get(mla.compress.wq_a.weight)  # a value: fetched as data
    out = k.grad(mla, x, wrt=[0])        # output, input gradient, parameter gradients

A reference (``k.g.Name``, an attribute chain, an item) costs nothing until it is called or fetched.
Whatever cannot travel as data (a module, a cache object) comes back as another reference (a handle).
Everything decoded is plain data: the judge compares, the kernel never sees expected values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from course_lib import wire


class Channel(Protocol):
    def roundtrip(self, request: bytes, timeout: float) -> bytes: ...


class ChannelError(Exception):
    """The kernel could not be asked (it died, hung, or answered with something that is not data)."""


class KernelGone(ChannelError):
    """The kernel is dead or stopped answering: nothing further can be graded in it."""


class CallTimeout(ChannelError):
    """One call ran past its time limit (the kernel was interrupted and still answers)."""


class LearnerError(Exception):
    """The learner's code raised while the judge called it."""

    def __init__(self, what: str, info: dict):
        self.what, self.type, self.message = what, str(info.get("type", "Exception")), str(info.get("message", ""))
        self.where = [str(w) for w in info.get("where", [])][:3]
        super().__init__(self.describe())

    @property
    def not_implemented(self) -> bool:
        return self.type == "NotImplementedError"

    def describe(self) -> str:
        if self.not_implemented:
            return f"{self.what} is not implemented yet (it raised NotImplementedError)"
        head = f"{self.what} raised {self.type}: {self.message}"
        return head + "".join(f"\n    at {w}" for w in self.where)


class Remote:
    """A reference to an object in the learner's kernel: attribute and item steps, calls."""

    __slots__ = ("_session", "_body", "_label")

    def __init__(self, session: Session, body: dict, label: str):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_body", body)
        object.__setattr__(self, "_label", label)

    def __getattr__(self, name: str) -> Remote:
        if name.startswith("__"):
            raise AttributeError(name)
        return Remote(self._session, {**self._body, "path": [*self._body.get("path", []), ["attr", name]]}, f"{self._label}.{name}")

    def __getitem__(self, key: int | str) -> Remote:
        if not isinstance(key, (int, str)):
            raise TypeError("remote items are ints or strings")
        return Remote(self._session, {**self._body, "path": [*self._body.get("path", []), ["item", key]]}, f"{self._label}[{key!r}]")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("use session.set(ref, value) to change an object in the kernel")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.call(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<remote {self._label}>"

    def __bool__(self) -> bool:
        raise TypeError(f"{self._label} is a reference into the learner's kernel: fetch it with session.get() first")


class _Globals:
    def __init__(self, session: Session):
        self._session = session

    def __getattr__(self, name: str) -> Remote:
        if name.startswith("__"):
            raise AttributeError(name)
        return Remote(self._session, {"root": ["global", name]}, name)

    __getitem__ = __getattr__


class Session:
    """One judge's conversation with one kernel; counts calls and time spent in the channel."""

    def __init__(self, channel: Channel, *, timeout: float = 60.0, max_reply_bytes: int = 64 << 20,
                 deadline: float | None = None):
        self.channel = channel
        self.timeout = timeout
        self.deadline = deadline  # time.monotonic() by which the whole exercise must be judged
        self.max_reply_bytes = max_reply_bytes
        self.g = _Globals(self)
        self.calls = 0
        self.channel_seconds = 0.0
        self.bytes = 0

    # -- references
    def lib(self, path: str) -> Remote:
        """An importable object in the kernel, e.g. ``"course_lib.deepseek.config:MLAConfig"`` or ``"torch:manual_seed"``."""
        return Remote(self, {"root": ["import", path]}, path.replace(":", "."))

    # -- the round trip
    def _encode_ref(self, v: Any) -> dict:
        if isinstance(v, Remote):
            return {"$ref": v._body}
        raise wire.WireError(f"cannot send a {type(v).__name__} to the kernel")

    def _decode_handle(self, body: dict) -> Remote:
        return Remote(self, {"root": ["handle", int(body["id"])]}, f"<{str(body.get('type', 'object'))[:60]} #{body['id']}>")

    def request(self, req: dict, what: str, timeout: float | None = None) -> Any:
        data = wire.dumps(req, on_object=self._encode_ref)
        limit = self.timeout if timeout is None else timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise CallTimeout("the exercise ran past its time limit before this check")
            limit = min(limit, left)
        t0 = time.perf_counter()
        try:
            raw = self.channel.roundtrip(data, limit)
        finally:
            self.channel_seconds += time.perf_counter() - t0
            self.calls += 1
        self.bytes += len(data) + len(raw)
        try:
            reply = wire.loads(raw, on_handle=self._decode_handle, max_bytes=self.max_reply_bytes)
        except wire.WireError as e:
            raise ChannelError(f"the kernel's answer to {what} is not plain data ({e})") from None
        if not isinstance(reply, dict) or not (set(reply) <= {"ok", "error"}) or len(reply) != 1:
            raise ChannelError(f"the kernel's answer to {what} is malformed")
        if "error" in reply:
            raise LearnerError(what, reply["error"] if isinstance(reply["error"], dict) else {})
        return reply["ok"]

    # -- operations
    def get(self, ref: Remote) -> Any:
        """The value ``ref`` names, as data (objects that are not data come back as references)."""
        return self.request({"op": "get", "obj": ref}, ref._label)

    def info(self, ref: Remote) -> dict:
        return self.request({"op": "info", "obj": ref}, ref._label)

    def has(self, name: str) -> bool:
        return bool(self.request({"op": "has", "name": name}, name))

    def set(self, ref: Remote, value: Any) -> None:
        """Set the attribute or item ``ref`` names."""
        path = ref._body.get("path", [])
        if not path:
            raise ValueError("set needs an attribute or item step")
        parent = Remote(self, {**ref._body, "path": path[:-1]}, ref._label)
        how, key = path[-1]
        self.request({"op": "set", "obj": parent, ("attr" if how == "attr" else "item"): key, "value": value}, ref._label)

    def call(self, ref: Remote, *args: Any, **kwargs: Any) -> Any:
        return self.request({"op": "call", "fn": ref, "args": list(args), "kwargs": kwargs}, f"{ref._label}(...)")

    def call_opts(self, ref: Remote, args: Sequence = (), kwargs: dict | None = None, *, no_grad: bool = False,
                  keep: bool = False, timeout: float | None = None) -> Any:
        """A call with options: ``no_grad``, ``keep`` (leave the result in the kernel), its own time limit."""
        req = {"op": "call", "fn": ref, "args": list(args), "kwargs": kwargs or {}, "no_grad": no_grad, "keep": keep}
        return self.request(req, f"{ref._label}(...)", timeout)

    def new(self, ref: Remote, *args: Any, **kwargs: Any) -> Remote:
        """Call ``ref`` and leave the result in the kernel (a config dataclass, a module): a reference to it."""
        return self.call_opts(ref, args, kwargs, keep=True)

    def grad(self, ref: Remote, *args: Any, wrt: Sequence[int] = (0,), grad_out: Any = None, params: Remote | None = None,
             output: int | str | None = None, **kwargs: Any) -> wire.Namespace:
        """Call ``ref``, back-propagate ``grad_out`` (default: ones) from its output.

        ``output`` picks what to back-propagate from: an item of a returned tuple (int) or an attribute of a
        returned object (str, e.g. ``"loss"`` of a ModelOutput).

        Returns ``.out``, ``.grads`` (one per index in ``wrt``) and ``.param_grads`` (of module ``params``).
        """
        req = {"op": "grad", "fn": ref, "args": list(args), "kwargs": kwargs, "wrt": list(wrt), "grad_out": grad_out,
               "params": params, "output": output}
        d = self.request(req, f"{ref._label}(...) with backward")
        if not isinstance(d, dict):
            raise ChannelError("malformed gradient answer")
        return wire.Namespace("grad", {"out": d.get("out"), "grads": d.get("grads", []), "param_grads": d.get("param_grads", {})})

    def profile(self, ref: Remote, *args: Any, no_grad: bool = True, **kwargs: Any) -> wire.Namespace:
        """One call under a FLOP counter and a shape recorder: ``.flops``, ``.peak_bytes``, ``.shapes`` (largest first).

        Reported by the kernel, so a structural check, never the only gate of a point: times come from
        :mod:`course_judge.timing`, measured here.
        """
        d = self.request({"op": "profile", "fn": ref, "args": list(args), "kwargs": kwargs, "no_grad": no_grad},
                         f"{ref._label}(...) under a profiler")
        if not isinstance(d, dict):
            raise ChannelError("malformed profile answer")
        return wire.Namespace("profile", {"flops": int(d.get("flops", 0)), "peak_bytes": int(d.get("peak_bytes", 0)),
                                          "shapes": [tuple(s) for s in d.get("shapes", [])]})

    def many(self, calls: Sequence[tuple[Remote, Sequence, dict]], *, no_grad: bool = False, keep: bool = False,
             timeout: float | None = None) -> list:
        """Several calls in one round trip; each result is data (a reference with ``keep``), or a :class:`LearnerError`."""
        reqs = [{"op": "call", "fn": r, "args": list(a), "kwargs": kw, "no_grad": no_grad, "keep": keep} for r, a, kw in calls]
        out = self.request({"op": "many", "requests": reqs}, "a batch of calls", timeout)
        if not isinstance(out, list) or len(out) != len(reqs):
            raise ChannelError("malformed batch answer")
        res = []
        for (r, _, _), item in zip(calls, out):
            if isinstance(item, dict) and "ok" in item:
                res.append(item["ok"])
            else:
                res.append(LearnerError(f"{r._label}(...)", item.get("error", {}) if isinstance(item, dict) else {}))
        return res

    def reset(self) -> None:
        self.request({"op": "reset"}, "reset")

    def seed(self, n: int) -> None:
        """``torch.manual_seed(n)`` in the kernel (before it builds modules with random weights)."""
        self.call(self.lib("torch:manual_seed"), n)


class LocalChannel:
    """An in-process channel to a namespace dict: the same wire format, no kernel (the mutant suite's)."""

    def __init__(self, namespace: dict):
        from course_lib.agent import Agent

        self.agent = Agent(namespace)

    def roundtrip(self, request: bytes, timeout: float) -> bytes:
        return self.agent.handle(bytes(request))
