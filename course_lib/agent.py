"""The kernel's end of the judge's channel: run one request on the learner's objects, answer with data.

While a notebook is graded, the course's judge (a trusted process outside the sandbox, see
``docs/GRADING.md``) never sends test code into the kernel. It runs one fixed line once::

    __import__("course_lib.agent").agent.listen()

and then talks over a Jupyter comm (target ``course_judge``): each request is a :mod:`course_lib.wire`
message in the comm message's binary buffer, each answer comes back the same way, tagged with a digest
of its request. A request names what to do with the learner's objects:

- ``get``: send back a value (tensors, numbers, strings, lists, dicts, dataclasses; anything else
  stays in the kernel and comes back as a handle);
- ``call``: call a function, a class or a method with plain arguments (``no_grad`` optional,
  ``keep`` to leave the result in the kernel as a handle);
- ``grad``: call, then back-propagate a given output gradient, and send back the output, the
  gradients of chosen inputs and of a module's parameters;
- ``set``: set an attribute or item; ``info``: type name, base classes, parameter names;
- ``profile``: call once under a FLOP counter and a shape recorder, and send back the FLOPs, the
  peak bytes of tensors created and the shapes of the largest intermediates (structure, not time:
  the judge times calls itself, from outside);
- ``many``: several requests in one round trip; ``reset``: drop the handles; ``ping``.

Objects are named by references: a global of the notebook, an importable ``module:attr`` or a handle,
followed by attribute and item steps. Nothing the judge decides (expected values, tolerances, verdicts)
ever travels here, and nothing this module answers is trusted beyond being the learner's answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import linecache
import os
import traceback
from collections.abc import Callable
from typing import Any

from course_lib import wire

TARGET = "course_judge"
LISTEN = '__import__("course_lib.agent").agent.listen()'
_LIB_DIR = os.path.dirname(os.path.abspath(__file__))


class Agent:
    """Answers judge requests against one namespace (the notebook's globals)."""

    def __init__(self, namespace: dict | Callable[[], dict]):
        self._namespace = namespace
        self.handles: dict[int, Any] = {}
        self._next = 0

    @property
    def ns(self) -> dict:
        return self._namespace() if callable(self._namespace) else self._namespace

    # -- references and handles
    def _keep(self, obj: Any) -> dict:
        self._next += 1
        self.handles[self._next] = obj
        return {"$handle": {"id": self._next, "type": type(obj).__name__}}

    def _resolve(self, body: dict) -> Any:
        root = body.get("root")
        if not (isinstance(root, list) and len(root) == 2):
            raise ValueError("malformed reference")
        kind, name = root
        if kind == "global":
            if name not in self.ns:
                raise NameError(f"the notebook defines no {name!r} (was its cell run? is it spelled as in the exercise?)")
            obj = self.ns[name]
        elif kind == "import":
            module, _, attr = str(name).partition(":")
            obj = importlib.import_module(module)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        elif kind == "handle":
            if name not in self.handles:
                raise LookupError(f"handle {name} is gone")
            obj = self.handles[name]
        else:
            raise ValueError(f"unknown reference root {kind!r}")
        for step in body.get("path", []):
            how, key = step
            if how == "attr":
                obj = getattr(obj, str(key))
            elif how == "item":
                obj = obj[key]
            else:
                raise ValueError(f"unknown reference step {how!r}")
        return obj

    # -- one request
    def handle(self, data: bytes) -> bytes:
        """Run one request (a wire message) and return the answer as a wire message."""
        try:
            req = wire.loads(data, on_ref=self._resolve)
            value = self._run(req)
            return wire.dumps({"ok": value}, on_object=self._on_object)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - every failure of the learner's code is an answer too
            return wire.dumps({"error": describe(e)})

    def _on_object(self, v: Any) -> dict:
        return self._keep(v.obj if isinstance(v, _Kept) else v)

    def _run(self, req: dict) -> Any:
        op = req.get("op")
        if op == "many":
            out = []
            for r in req["requests"]:
                try:
                    out.append({"ok": self._run(r)})
                except Exception as e:  # noqa: BLE001
                    out.append({"error": describe(e)})
            return out
        if op == "ping":
            return "pong"
        if op == "reset":
            self.handles.clear()
            return None
        if op == "has":
            return req["name"] in self.ns
        if op == "get":
            return _Kept(req["obj"]) if req.get("keep") else req["obj"]
        if op == "info":
            return info(req["obj"])
        if op == "set":
            obj, value = req["obj"], req["value"]
            if "attr" in req:
                setattr(obj, req["attr"], value)
            else:
                obj[req["item"]] = value
            return None
        if op == "call":
            with _quiet(), _grad_mode(req.get("no_grad", False)):
                out = req["fn"](*req.get("args", []), **req.get("kwargs", {}))
            return _Kept(out) if req.get("keep") else out
        if op == "grad":
            return self._grad(req)
        if op == "profile":
            return profile(req["fn"], req.get("args", []), req.get("kwargs", {}), no_grad=req.get("no_grad", True))
        raise ValueError(f"unknown request {op!r}")

    def _grad(self, req: dict) -> dict:
        import torch

        args = list(req.get("args", []))
        wrt = req.get("wrt", [])
        for i in wrt:
            args[i] = args[i].detach().clone().requires_grad_(True)
        module = req.get("params")
        if module is not None:
            for p in module.parameters():
                p.grad = None
        with _quiet(), torch.enable_grad():
            out = req["fn"](*args, **req.get("kwargs", {}))
            pick = req.get("output")
            y = out if pick is None else getattr(out, pick) if isinstance(pick, str) else out[pick]
            g = req.get("grad_out")
            loss = y.sum() if g is None else (y * g.to(y.dtype)).sum()
            loss.backward()
        result = {"out": out, "grads": [args[i].grad for i in wrt]}
        if module is not None:
            result["param_grads"] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        return result


class _Kept:
    """Marks a result to leave in the kernel as a handle."""

    def __init__(self, obj: Any):
        self.obj = obj


@contextlib.contextmanager
def _quiet():
    """The learner's prints during a judge call are dropped (they would flood the channel)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _grad_mode(no_grad: bool):
    if not no_grad:
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def _matmul_flops(func, args) -> int:
    """FLOPs of one matrix-product op (2 per multiply-add), from its operands' shapes.

    Fused attention is counted through the products it runs as (on the CPU its math kernel dispatches them).
    """
    name = getattr(func, "__name__", str(func)).split(".")[0]
    try:
        if name in ("mm", "addmm"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        if name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    except (AttributeError, IndexError, TypeError):
        return 0
    return 0


def profile(fn: Callable, args: list, kwargs: dict, *, no_grad: bool = True, keep_shapes: int = 64) -> dict:
    """FLOPs of matrix products, peak bytes of new tensors and the largest intermediate shapes of one call."""
    import torch

    from course_lib.bench import MemoryTracker

    shapes: dict[tuple, int] = {}
    flops = 0

    class _Profile(MemoryTracker):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            nonlocal flops
            flops += _matmul_flops(func, a)
            out = super().__torch_dispatch__(func, types, a, kw)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes[tuple(t.shape)] = max(shapes.get(tuple(t.shape), 0), t.numel())
            return out

    with _quiet(), _grad_mode(no_grad), _Profile() as mem:
        out = fn(*args, **kwargs)
        del out
    biggest = sorted(shapes.items(), key=lambda kv: -kv[1])[:keep_shapes]
    return {"flops": int(flops), "peak_bytes": int(mem.peak), "shapes": [list(s) for s, _ in biggest]}


def info(obj: Any) -> dict:
    """What the judge may want to know about an object's kind (for messages, never for verdicts alone)."""
    cls = obj if isinstance(obj, type) else type(obj)
    out = {"type": cls.__name__, "mro": [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__],
           "callable": callable(obj)}
    try:
        import torch

        if isinstance(obj, torch.nn.Module):
            out["parameters"] = {n: list(p.shape) for n, p in obj.named_parameters()}
            out["buffers"] = {n: list(b.shape) for n, b in obj.named_buffers()}
            out["training"] = bool(obj.training)
    except Exception:  # noqa: BLE001
        pass
    return out


def describe(e: BaseException) -> dict:
    """The learner-facing description of an exception: type, message, and where in the learner's code."""
    where = []
    for fr in traceback.extract_tb(e.__traceback__):
        fn = fr.filename or ""
        if fn.startswith(_LIB_DIR) or "site-packages" in fn or fn.startswith("<frozen") or "/lib/python" in fn:
            continue
        line = (fr.line or linecache.getline(fn, fr.lineno or 0)).strip()
        where.append(f"line {fr.lineno} in {fr.name}: {line[:160]}")
    return {"type": type(e).__name__, "message": str(e)[:2000], "where": where[-3:]}


def _kernel_namespace() -> dict:
    from IPython import get_ipython  # the builtin exists only while a cell runs, not in a comm handler

    return get_ipython().user_ns


def request_digest(request: bytes) -> bytes:
    """What binds an answer to its request: the first 16 bytes of the request's SHA-256."""
    return hashlib.sha256(request).digest()[:16]


def listen() -> None:
    """Kernel entry point: answer the judge's requests on comms of target :data:`TARGET`.

    Each answer carries :func:`request_digest` of its request, so a comm message sent by anything else in
    the kernel (a thread, a hook) is not taken for the answer to a request.
    """
    from comm import get_comm_manager

    agent = Agent(_kernel_namespace)

    def opened(comm, open_msg) -> None:
        def received(msg) -> None:
            buffers = msg.get("buffers") or []
            if not buffers:
                return
            request = bytes(buffers[0])
            try:
                reply = agent.handle(request)
            except KeyboardInterrupt:  # the judge interrupted a call past its time limit
                reply = wire.dumps({"error": {"type": "KeyboardInterrupt", "message": "interrupted", "where": []}})
            comm.send({"re": request_digest(request).hex()}, buffers=[reply])

        comm.on_msg(received)

    get_comm_manager().register_target(TARGET, opened)
