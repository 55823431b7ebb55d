"""The judge's channel to a real (sandboxed) Jupyter kernel, used while nbgrader executes a notebook.

The judge runs in a worker thread of the grading process; each request is handed to the executor's
event loop, which sends one fixed line of code (``course_lib.agent.ENTRY``) with the request as its
argument and waits for the display message that carries the answer. Everything else the kernel
prints meanwhile is dropped. A call past its time limit interrupts the kernel; a kernel that does not
come back, or that dies, ends the judging of this notebook (:class:`KernelGone`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import queue
import time

from course_judge.session import CallTimeout, ChannelError, KernelGone
from course_lib.agent import ENTRY, MIME, request_digest


class KernelChannel:
    """A channel through ``executor.kc`` (nbclient's kernel client) on the executor's event loop."""

    def __init__(self, executor, loop: asyncio.AbstractEventLoop, *, max_reply_bytes: int = 64 << 20,
                 responsive_timeout: float = 15.0):
        self.ex = executor
        self.loop = loop
        self.max_reply_bytes = max_reply_bytes
        self.responsive_timeout = responsive_timeout
        self.dead: str | None = None

    def roundtrip(self, request: bytes, timeout: float) -> bytes:
        if self.dead:
            raise KernelGone(self.dead)
        fut = asyncio.run_coroutine_threadsafe(self._roundtrip(request, timeout), self.loop)
        return fut.result()

    async def _roundtrip(self, request: bytes, timeout: float) -> bytes:
        kc = self.ex.kc
        code = ENTRY.format(payload=base64.b64encode(request).decode("ascii"))
        msg_id = kc.execute(code, silent=False, store_history=False, allow_stdin=False, stop_on_error=False)
        reply, idle = await self._collect(msg_id, time.monotonic() + timeout, request_digest(request))
        if not idle:
            await self._interrupt(msg_id)
            raise CallTimeout(f"the call did not finish within {timeout:g} s (the kernel was interrupted)")
        await self._drain_shell(msg_id)
        if reply is None:
            raise ChannelError("the kernel did not answer the judge's request (is course_lib.agent intact?)")
        if reply == b"":
            raise ChannelError(f"the kernel's answer is over {self.max_reply_bytes >> 20} MB")
        return reply

    async def _collect(self, msg_id: str, deadline: float, digest: bytes = b"") -> tuple[bytes | None, bool]:
        """The answer to ``msg_id`` (the first display message carrying ``digest``) and whether the kernel went idle."""
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
            if kind in ("display_data", "execute_result") and reply is None and digest:
                data = content.get("data", {}).get(MIME)
                if not isinstance(data, str):
                    continue
                if len(data) > self.max_reply_bytes * 4 // 3 + 64:
                    reply = b""  # too big: refused below (the kernel's answer is not read)
                    continue
                try:
                    raw = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    continue
                if raw[:16] == digest:
                    reply = raw[16:]
            elif kind == "status" and content.get("execution_state") == "idle":
                return reply, True

    async def _interrupt(self, msg_id: str) -> None:
        try:
            await self.ex.km.interrupt_kernel()
        except Exception:  # noqa: BLE001 - a kernel that cannot be interrupted is treated as gone below
            pass
        try:
            _, idle = await self._collect(msg_id, time.monotonic() + self.responsive_timeout)
        except KernelGone:
            raise
        if not idle:
            self.dead = "the kernel did not stop when a judge call ran past its time limit"
            raise KernelGone(self.dead)
        await self._drain_shell(msg_id)

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
