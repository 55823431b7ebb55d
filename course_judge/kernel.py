"""The judge's channel to a real (sandboxed) Jupyter kernel, used while nbgrader executes a notebook.

The judge runs in a worker thread of the grading process; each request is handed to the executor's event
loop. The first request of a kernel runs one fixed line (``course_lib.agent.LISTEN``) that opens the
kernel's end, then a Jupyter comm is opened to it. Every request is a comm message whose binary buffer
holds the request; the answer is the comm message from the kernel that carries the request's digest
(anything else the kernel sends meanwhile is dropped). Binary buffers skip base64 and JSON, which matters
for weights and caches. A call past its time limit interrupts the kernel; a kernel that does not come
back, or that dies, ends the judging of this notebook (:class:`KernelGone`).
"""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from pathlib import Path

from course_judge.session import CallTimeout, ChannelError, KernelGone
from course_lib.agent import LISTEN, TARGET, request_digest


class KernelChannel:
    """A channel through ``executor.kc`` (nbclient's kernel client) on the executor's event loop."""

    def __init__(self, executor, loop: asyncio.AbstractEventLoop, *, max_reply_bytes: int = 64 << 20,
                 responsive_timeout: float = 15.0):
        self.ex = executor
        self.loop = loop
        self.max_reply_bytes = max_reply_bytes
        self.responsive_timeout = responsive_timeout
        self.dead: str | None = None
        self.comm_id: str | None = None

    def shared_folder(self) -> Path | None:
        """The kernel's private IPC folder (reachable from inside its sandbox), or None for a TCP kernel."""
        km = self.ex.km
        return Path(km.ip).parent if getattr(km, "transport", "") == "ipc" and getattr(km, "ip", "") else None

    def roundtrip(self, request: bytes, timeout: float) -> bytes:
        if self.dead:
            raise KernelGone(self.dead)
        fut = asyncio.run_coroutine_threadsafe(self._roundtrip(request, timeout), self.loop)
        return fut.result()

    async def _open(self, deadline: float) -> None:
        """Start the kernel's end (one line of code) and open the comm to it."""
        kc = self.ex.kc
        msg_id = kc.execute(LISTEN, silent=False, store_history=False, allow_stdin=False, stop_on_error=False)
        _, idle = await self._collect(msg_id, deadline)
        if not idle:
            await self._interrupt(msg_id)
            raise CallTimeout("the kernel did not start the judge's channel in time")
        await self._drain_shell(msg_id)
        self.comm_id = uuid.uuid4().hex
        msg = kc.session.msg("comm_open", {"comm_id": self.comm_id, "target_name": TARGET, "data": {}})
        kc.shell_channel.send(msg)
        await self._collect(msg["header"]["msg_id"], deadline)

    async def _roundtrip(self, request: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        if self.comm_id is None:
            await self._open(deadline)
        kc = self.ex.kc
        msg = kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": {}})
        msg["buffers"] = [request]
        kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        reply, idle = await self._collect(msg_id, deadline, request_digest(request).hex())
        if not idle:
            await self._interrupt(msg_id)
            raise CallTimeout(f"the call did not finish within {timeout:g} s (the kernel was interrupted)")
        if reply is None:
            raise ChannelError("the kernel did not answer the judge's request (is course_lib.agent intact?)")
        if reply == b"":
            raise ChannelError(f"the kernel's answer is over {self.max_reply_bytes >> 20} MB")
        return reply

    async def _collect(self, msg_id: str, deadline: float, digest: str = "") -> tuple[bytes | None, bool]:
        """The answer to ``msg_id`` (the first comm message carrying ``digest``) and whether the kernel went idle."""
        kc = self.ex.kc
        reply: bytes | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return reply, False
            try:
                msg = await kc.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not await self.ex.km.is_alive():
                    self.dead = "the kernel died (memory or CPU limit, a crash, or exit() in the code)"
                    raise KernelGone(self.dead) from None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg.get("msg_type"), msg.get("content", {})
            if kind == "comm_msg" and reply is None and digest:
                data = content.get("data") or {}
                buffers = msg.get("buffers") or []
                if content.get("comm_id") != self.comm_id or not isinstance(data, dict) or data.get("re") != digest or not buffers:
                    continue
                reply = b"" if len(buffers[0]) > self.max_reply_bytes else bytes(buffers[0])  # too big: refused
            elif kind == "status" and content.get("execution_state") == "idle":
                return reply, True

    async def _interrupt(self, msg_id: str) -> None:
        try:
            await self.ex.km.interrupt_kernel()
        except Exception:  # noqa: BLE001 - a kernel that cannot be interrupted is treated as gone below
            pass
        _, idle = await self._collect(msg_id, time.monotonic() + self.responsive_timeout)
        if not idle:
            self.dead = "the kernel did not stop when a judge call ran past its time limit"
            raise KernelGone(self.dead)

    async def _drain_shell(self, msg_id: str) -> None:
        kc = self.ex.kc
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                msg = await kc.shell_channel.get_msg(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                return
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                return
