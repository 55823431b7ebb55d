"""The judge's draft server: a test-writing exercise's drafts, computed on the judge's side, called from the kernel.

A learner's test is judged by the drafts it passes and the ones it catches. If the drafts lived in the kernel,
hostile code there could read how each was built (its switches sit in a closure, or a patched factory could tag
it) and pass or fail it without testing anything. So the judge builds them here, from the trusted
``course_lib``, and serves them over a Unix socket in a folder the kernel can reach (its private IPC folder when
sandboxed). The kernel holds stand-ins (``course_lib.drafts.stand_ins``) that know a random token per draft and
what any implementation shows from outside: a function's signature, a module's layers. Each call sends plain
data (``course_lib.wire``: JSON and safetensors, nothing executable) and gets back what the draft computed.

Requests are bounded (64 MB a message, a cost cap on module calls, four connections at a time) and a draft that
raises answers with the exception's type and message. The server lives for one exercise (a ``with`` block).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import secrets
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_lib import wire
from course_lib.drafts import MAX_MESSAGE, recv_message, send_message

MAX_CONNECTIONS = 4
MAX_MODULE_MACS = 1 << 32  # rows of the input x the parameters' elements: a few seconds of CPU at most
MAX_SIZE = 1 << 20  # largest constructor argument of a module draft
IDLE_S = 600.0  # a connection that sends nothing for this long is closed


class Refused(Exception):
    """A request the server does not compute (unknown draft, malformed, too large)."""


def _params(sig: inspect.Signature, skip_self: bool = False) -> list[list]:
    out = []
    for i, p in enumerate(sig.parameters.values()):
        if skip_self and i == 0:
            continue
        out.append([p.name, p.kind.name] + ([] if p.default is inspect.Parameter.empty else [p.default]))
    return out


def spec_of(token: str, draft: Callable) -> dict:
    """What the kernel's stand-in may know of ``draft``: its token, name and outside shape, nothing of how it is built."""
    if isinstance(draft, type) and issubclass(draft, nn.Module):
        init = inspect.signature(draft.__init__)
        names = [n for n in list(init.parameters)[1:]]
        sizes = {n: 2 + 3 * i for i, n in enumerate(names)}  # distinct sizes show which argument sizes which layer
        with torch.device("meta"):
            m = draft(**sizes)
        by_size = {v: n for n, v in sizes.items()}
        linears: dict[str, list] = {}
        for name, child in m.named_children():
            if type(child) is not nn.Linear or not ({child.in_features, child.out_features} <= set(by_size)):
                raise TypeError(f"a module draft is built from nn.Linear layers sized by its arguments; {name} is not")
            linears[name] = [by_size[child.in_features], by_size[child.out_features], child.bias is not None]
        if len(list(m.parameters())) != sum(2 if b else 1 for *_, b in linears.values()):
            raise TypeError("a module draft's parameters are its layers' weights and biases")
        return {"token": token, "kind": "module", "name": draft.__name__, "params": _params(init, skip_self=True),
                "linears": linears}
    return {"token": token, "kind": "function", "name": getattr(draft, "__name__", "draft"),
            "params": _params(inspect.signature(draft))}


class DraftServer:
    """Serves ``drafts`` (token -> function or module class) on a Unix socket in ``folder`` while in a ``with`` block."""

    def __init__(self, drafts: dict[str, Callable], folder: Path | None = None):
        self.drafts = drafts
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="course-drafts-")) if folder is None else Path(folder)
        self.path = str(self.folder / f"d-{secrets.token_hex(4)}")  # short: a Unix socket's path has at most 107 bytes
        if len(self.path.encode()) > 107:
            raise RuntimeError(f"the draft server's socket path is too long for a Unix socket: {self.path} "
                               "(set COURSE_KERNEL_RUNTIME_DIR to a shorter folder)")
        self.requests = 0
        self.active: str | None = None  # the one draft that answers (None: all), while its test runs
        self._modules: dict[tuple, nn.Module] = {}
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._open)

    def specs(self, tokens: list[str]) -> list[dict]:
        return [spec_of(t, self.drafts[t]) for t in tokens]

    # -- life
    def __enter__(self) -> DraftServer:
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve(self.request)

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:  # in the accepting thread: counted at once
                with owner._lock:
                    if len(owner._open) >= MAX_CONNECTIONS:
                        return False
                    owner._open.add(request)
                    return True

        self._server = Server(self.path, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="course-draft-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            Path(self.path).unlink()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(IDLE_S)
            while True:
                raw = recv_message(sock)
                if raw is None:
                    return
                send_message(sock, self.answer(raw))
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(sock)

    # -- one request
    def answer(self, raw: bytes) -> bytes:
        """The encoded answer to one encoded request: ``{"ok": value}`` or ``{"error": {"type", "message"}}``."""
        self.requests += 1
        try:
            out: dict = {"ok": self._compute(wire.loads(raw, max_bytes=MAX_MESSAGE))}
        except (Refused, wire.WireError) as e:
            out = {"error": {"type": "RuntimeError", "message": f"the draft server refused the call: {e}"}}
        except Exception as e:  # noqa: BLE001 - what the draft raised goes back to the learner's test
            out = {"error": {"type": type(e).__name__, "message": str(e)[:500]}}
        try:
            return wire.dumps(out)
        except wire.WireError as e:
            return wire.dumps({"error": {"type": "TypeError", "message": f"the draft's answer is not data ({e})"}})

    def _compute(self, req: Any) -> Any:
        if not isinstance(req, dict) or not isinstance(req.get("token"), str) or req["token"] not in self.drafts:
            raise Refused("no such draft")
        if self.active is not None and req["token"] != self.active:
            raise RuntimeError("this draft's test is over: a stand-in answers only during its own test")
        draft, op = self.drafts[req["token"]], req.get("op")
        if op == "call" and not isinstance(draft, type):
            args, kwargs = req.get("args"), req.get("kwargs")
            if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise Refused("malformed call")
            return draft(*args, **kwargs)
        if op in ("forward", "backward") and isinstance(draft, type):
            return self._module_call(req, draft, op)
        raise Refused(f"unknown operation {op!r}")

    def _module_call(self, req: dict, cls: type, op: str) -> Any:
        init, params, x = req.get("init"), req.get("params"), req.get("x")
        if not (isinstance(init, list) and all(type(v) is int and 0 < v <= MAX_SIZE for v in init)):
            raise Refused(f"a module draft is built from sizes between 1 and {MAX_SIZE}")
        module = self._module(req["token"], cls, tuple(init))
        want = {n: tuple(p.shape) for n, p in module.named_parameters()}
        if not isinstance(params, dict) or set(params) != set(want) or not all(isinstance(p, torch.Tensor) for p in params.values()):
            raise RuntimeError(f"the module's parameters changed: it has {', '.join(want)}")
        rows = math.prod(x.shape[:-1]) if isinstance(x, torch.Tensor) else 1  # (..., dim): every row meets every layer
        if rows * sum(p.numel() for p in params.values()) > MAX_MODULE_MACS:
            raise Refused("the input and the layers are too large for a test")
        if op == "forward":
            with torch.no_grad():
                return torch.func.functional_call(module, params, (x,))
        grad_out = req.get("grad_out")
        leaves = {n: p.detach().requires_grad_(p.is_floating_point() or p.is_complex()) for n, p in params.items()}
        xin = x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
        with torch.enable_grad():
            y = torch.func.functional_call(module, leaves, (xin,))
            inputs = [t for t in (xin, *leaves.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad(y, inputs, grad_out, allow_unused=True) if inputs else ()
        found = dict(zip(map(id, inputs), grads))
        return found.get(id(xin)), {n: found.get(id(t)) for n, t in leaves.items()}

    def _module(self, token: str, cls: type, init: tuple) -> nn.Module:
        key = (token, init)
        if key not in self._modules:
            with torch.device("meta"):  # no memory, no random numbers: the kernel's weights come with each call
                self._modules[key] = cls(*init)
            if len(self._modules) > 64:
                self._modules.pop(next(iter(self._modules)))
        return self._modules[key]
