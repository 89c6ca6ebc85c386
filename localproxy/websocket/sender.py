"""The websocket writer of one session: scheduler -> paced messages (the I/O half of the send path).

:class:`Sender` takes one websocket message at a time from its
:class:`~localproxy.tunnel.scheduler.SendScheduler`, of the size the
:class:`~localproxy.tunnel.pacing.Pacer` allows, and keeps what sits below it small:
websockets' write buffer and the kernel's unsent bytes (``TCP_NOTSENT_LOWAT``,
and on a slow link a wait while ``SIOCOUTQNSD`` shows more than the budget), so
that the queue lives where it can be reordered.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from localproxy.sockopts import NOTSENT_LOWAT
from localproxy.tunnel.actions import DataFramer
from localproxy.tunnel.pacing import Pacer
from localproxy.tunnel.scheduler import SendScheduler
from localproxy.wire.codec import BytesLike

__all__ = ["Sender", "kernel_unsent", "tune_send_buffers"]

logger = logging.getLogger("localproxy.proxy")



# Linux: bytes the kernel holds but has not sent yet (SIOCOUTQNSD).
_SIOCOUTQNSD = 0x894B if sys.platform.startswith("linux") else None
_OPEN = State.OPEN
UNSENT_POLLS = 200  # at most this many short waits for the kernel's unsent bytes per message


def kernel_unsent(sock: Any) -> int:
    """The kernel's unsent bytes on ``sock`` (0 where that cannot be known)."""
    if _SIOCOUTQNSD is None or sock is None or fcntl is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def tune_send_buffers(ws: Any, budget: int) -> None:
    """Let websockets' write buffer and the kernel's unsent bytes (``TCP_NOTSENT_LOWAT``)
    hold about ``budget`` each. On a fast link too: the kernel's send buffer drains in
    microseconds only while the far end keeps up; when it does not (a busy relay or
    receiving proxy), the kernel grows it to megabytes (measured: 4 MB) that a keystroke
    then waits behind. The mark costs ~0.05-0.1 CPU-s/GiB in bulk (more, smaller writes)."""
    transport = ws.transport
    try:
        transport.set_write_buffer_limits(high=budget, low=budget // 4)
    except (AttributeError, RuntimeError):  # pragma: no cover - closing
        return
    sock = transport.get_extra_info("socket")
    if NOTSENT_LOWAT is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, NOTSENT_LOWAT, budget)
        except (OSError, TypeError, ValueError):  # pragma: no cover - not supported here, or closed
            pass


class Sender:
    """The websocket writer of one session: scheduler -> paced messages."""

    def __init__(self, ws: Any, on_resumed: Callable[[list[int]], None]) -> None:
        self._ws = ws
        self.scheduler = SendScheduler()
        self.pacer = Pacer()
        self._wakeup = asyncio.Event()
        self._on_resumed = on_resumed
        self._idle = False  # the task waits for data: a push may send at once
        # websockets' sans-I/O protocol and the connection's direct writer (connection.py),
        # for sending without a task switch.
        self._protocol: Any = getattr(ws, "protocol", None)
        self._write_message: Callable[[bytes], None] | None = getattr(ws, "write_message", None)
        tune_send_buffers(ws, self.pacer.budget)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def push_control(self, frame: bytes, key: int, service_id: str | None) -> None:
        self.scheduler.push_control(frame, key, service_id)
        self._kick()

    def push_data(self, key: int, service_id: str, framer: DataFramer, data: BytesLike) -> bool:
        """Queue a connection's payload; True: stop reading that connection for now."""
        if self._idle and not self.scheduler:
            # Nothing queued, nothing to order it behind: a payload that fits one message
            # leaves at once, without the scheduler's bookkeeping (a keystroke's path).
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            if 0 < size <= framer.max_payload and size + framer.overhead <= self.pacer.budget and self._may_send_now():
                header, payload = framer.frames(data)
                self._send_now(bytes(header) + payload)
                return False
        pause = self.scheduler.push_data(key, service_id, framer, data)
        self._kick()
        return pause

    def _kick(self) -> None:
        """Send now if nothing is in the way, else wake the task."""
        if self._idle and self._may_send_now():
            self._send_now(self._take())
            if self.scheduler:
                self._wakeup.set()
        else:
            self._wakeup.set()

    def _may_send_now(self) -> bool:
        """May a message skip the task? While the task is idle and websockets' write
        buffer is empty: the keystroke of an idle tunnel leaves without waiting one
        event-loop turn. Anything else (a buffer to drain, a slow link's pacing, a
        closing websocket) goes through the task and ``ws.send``. ``TCP_NOTSENT_LOWAT``
        (the budget) keeps a run of such writes from pouring into the kernel's send
        buffer: past it the kernel takes no more (bar the rest of its last segment
        buffer), the write buffer fills, the task takes over.
        """
        if self._write_message is None:
            return False
        try:
            if self._protocol.state is not _OPEN or self._ws.transport.get_write_buffer_size():
                return False
        except Exception:  # noqa: BLE001 - closing under us: the task's ws.send reports it
            return False
        return True

    def _send_now(self, message: bytes) -> None:
        assert self._write_message is not None
        try:
            self._write_message(message)
        except Exception:  # noqa: BLE001 - closing under us: the session ends anyway
            self._wakeup.set()

    def _take(self) -> bytes:
        """The next message from the scheduler; connections it has room for again resume."""
        scheduler = self.scheduler
        parts = scheduler.take_message(self.pacer.budget)
        resumed = scheduler.take_resumed()
        if resumed:
            self._on_resumed(resumed)
        return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[return-value]

    async def _run(self) -> None:
        scheduler = self.scheduler
        pacer = self.pacer
        ws = self._ws
        clock = asyncio.get_running_loop().time
        try:
            while True:
                if not scheduler:
                    if pacer.idle():
                        tune_send_buffers(ws, pacer.budget)
                    self._wakeup.clear()
                    self._idle = True
                    try:
                        await self._wakeup.wait()
                    finally:
                        self._idle = False
                    continue
                data = self._take()
                pacer.sending(clock())  # before any wait: the link's time counts whole
                if pacer.slow and pacer.rate is not None:
                    await self._wait_kernel(pacer.budget, pacer.rate)
                await ws.send(data)
                if pacer.sent(len(data), clock()):
                    tune_send_buffers(ws, pacer.budget)
        except ConnectionClosed:
            pass  # the receive loop sees it too and ends the session
        except Exception:  # noqa: BLE001 - a bug: end the session rather than hang
            logger.exception("Websocket sender failed")
            await ws.close(1011, "internal error")

    async def _wait_kernel(self, budget: int, rate: float) -> None:
        """On a slow link, keep the kernel's unsent bytes near ``budget``.

        ``TCP_NOTSENT_LOWAT`` only gates new socket buffers: a write that fits in
        the last one (up to 64 KiB) still goes in, so without this the kernel
        would hold up to 64 KiB more than the budget (80 ms at 800 kB/s).
        """
        sock = self._ws.transport.get_extra_info("socket")
        for _ in range(UNSENT_POLLS):
            unsent = kernel_unsent(sock)
            if unsent <= budget:
                return
            await asyncio.sleep(min(0.05, (unsent - budget) / rate))

    def stop(self) -> None:
        self._task.cancel()

    def abort(self) -> None:
        """Drop the websocket's TCP connection at once (the peer takes none of our bytes)."""
        transport = getattr(self._ws, "transport", None)
        if transport is not None and not transport.is_closing():
            transport.abort()
