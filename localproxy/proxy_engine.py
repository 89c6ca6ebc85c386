"""Carrying out the tunnel's actions: the websocket sender and the local side hub.

:class:`Engine` is what a :class:`~localproxy.proxy.LocalProxy` session loop
hands the sans-I/O tunnel's actions to, and what every local connection reports
to (it implements :class:`~localproxy.adapters.LocalHub`). It lives as long as
the proxy (listeners survive reconnects); a :class:`Sender` lives for one session.

Send path: frames wait in the session's :class:`~localproxy.scheduler.SendScheduler`
(one queue per local connection, fair and order-safe); the :class:`Sender` task
takes one websocket message at a time from it, of the size the
:class:`~localproxy.pacing.Pacer` allows, and keeps what sits below it small
(websockets' write buffer and the kernel's unsent bytes, ``TCP_NOTSENT_LOWAT``),
so that the queue lives where it can be reordered. A connection whose own queue
is full stops being read (``PAUSE_CONGESTED``) until the scheduler resumes it;
the others go on being read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
from collections import defaultdict
from typing import Any, Callable

from websockets.exceptions import ConnectionClosed

from .adapters import PAUSE_CONGESTED, PAUSE_HELD, LocalConnection, listen
from .codec import BytesLike
from .config import Mode, ProxyConfig
from .errors import LocalProxyError
from .events import ErrorEvent, Event, Listening, TunnelReady
from .pacing import Pacer
from .scheduler import SendScheduler
from .tunnel import TunnelState
from .tunnel_actions import (
    Close,
    Connect,
    DataFramer,
    Fatal,
    Hold,
    Listen,
    Log,
    Release,
    RestartSession,
    Send,
    SendData,
    StopListen,
    Write,
)

__all__ = ["Engine", "Sender", "tune_send_buffers"]

logger = logging.getLogger("localproxy.proxy")

# Linux has it in the socket module; macOS's value is 0x201; elsewhere the kernel's
# send buffer is not bounded by us (the scheduler still orders what is above it).
_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", 0x201 if sys.platform == "darwin" else None)


# Linux: bytes the kernel holds but has not sent yet (SIOCOUTQNSD).
_SIOCOUTQNSD = 0x894B if sys.platform.startswith("linux") else None
UNSENT_POLLS = 200  # at most this many short waits for the kernel's unsent bytes per message


def kernel_unsent(sock: Any) -> int:
    """The kernel's unsent bytes on ``sock`` (0 where that cannot be known)."""
    if _SIOCOUTQNSD is None or sock is None:
        return 0
    try:
        import fcntl

        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def tune_send_buffers(ws: Any, budget: int) -> None:
    """Let websockets' write buffer and the kernel's unsent bytes hold about ``budget`` each."""
    transport = ws.transport
    try:
        transport.set_write_buffer_limits(high=budget, low=budget // 4)
    except (AttributeError, RuntimeError):  # pragma: no cover - closing
        return
    sock = transport.get_extra_info("socket")
    if _NOTSENT_LOWAT is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, budget)
        except OSError:  # pragma: no cover - not supported here, or closed
            pass


class Sender:
    """The websocket writer of one session: scheduler -> paced messages."""

    def __init__(self, ws: Any, on_resumed: Callable[[list[int]], None]) -> None:
        self._ws = ws
        self.scheduler = SendScheduler()
        self.pacer = Pacer()
        self._wakeup = asyncio.Event()
        self._on_resumed = on_resumed
        tune_send_buffers(ws, self.pacer.budget)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def push_control(self, frame: bytes, key: int, service_id: str | None) -> None:
        self.scheduler.push_control(frame, key, service_id)
        self._wakeup.set()

    def push_data(self, key: int, service_id: str, framer: DataFramer, data: BytesLike) -> bool:
        """Queue a connection's payload; True: stop reading that connection."""
        pause = self.scheduler.push_data(key, service_id, framer, data)
        self._wakeup.set()
        return pause

    async def _run(self) -> None:
        scheduler = self.scheduler
        pacer = self.pacer
        ws = self._ws
        clock = asyncio.get_running_loop().time
        try:
            while True:
                if not scheduler:
                    pacer.idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                parts = scheduler.take_message(pacer.budget)
                resumed = scheduler.take_resumed()
                if resumed:
                    self._on_resumed(resumed)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if pacer.rate is not None and pacer.budget < pacer.maximum:
                    await self._wait_kernel(pacer.budget, pacer.rate)
                pacer.sending(clock())
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


class Engine:
    """Local connections, listeners and the current session's sender of one proxy."""

    def __init__(self, config: ProxyConfig, tunnel: TunnelState, emit: Callable[[Event], None]) -> None:
        self.config = config
        self.tunnel = tunnel
        self.emit = emit
        self.ports: dict[str, int] = {}
        self.fatal: LocalProxyError | None = None  # stop the proxy
        self.restart: LocalProxyError | None = None  # end this session, reconnect
        self.ready = False  # the tunnel's services were known once
        self.on_ready: Callable[[], None] = lambda: None
        self.writers_drained = asyncio.Event()  # no local writer over its high-water mark
        self.writers_drained.set()
        self.sender: Sender | None = None
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._conns: dict[int, LocalConnection] = {}
        self._paused_writers: set[LocalConnection] = set()
        # Per service id, for LocalProxy.stats(): one += where the bytes pass anyway.
        self.bytes_sent: defaultdict[str, int] = defaultdict(int)  # local apps -> tunnel
        self.bytes_received: defaultdict[str, int] = defaultdict(int)  # tunnel -> local apps

    @property
    def paused_writers(self) -> frozenset[LocalConnection]:
        return frozenset(self._paused_writers)

    # --- sessions ------------------------------------------------------------------

    def session_started(self, ws: Any) -> None:
        self.restart = None
        self.sender = Sender(ws, self._resume_reading)

    def session_ended(self) -> None:
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        self.apply(self.tunnel.session_lost())
        self._resume_reading(list(self._conns))

    def shutdown(self) -> None:
        """Stop listening and close every local connection (flushing what is queued)."""
        for servers in self._servers.values():
            for server in servers:
                server.close()
        self._servers.clear()
        self.ports.clear()
        for conn in list(self._conns.values()):
            conn.close(True)
        self._conns.clear()
        self._paused_writers.clear()
        self.writers_drained.set()

    # --- actions -------------------------------------------------------------------

    def apply(self, actions: list[Any]) -> None:
        """Carry out actions and events in order (all but Listen/StopListen)."""
        conns = self._conns
        for action in actions:
            kind = action.__class__
            if kind is SendData:
                sender = self.sender
                if sender is not None and sender.push_data(action.key, action.service_id, action.framer, action.data):
                    conn = conns.get(action.key)
                    if conn is not None:
                        conn.pause_reading(PAUSE_CONGESTED)
            elif kind is Write:
                conn = conns.get(action.key)
                if conn is not None:
                    conn.write(action.data)
                    self.bytes_received[conn.service_id] += len(action.data)
            elif kind is Close:
                conn = conns.pop(action.key, None)
                if conn is not None:
                    self._paused_writers.discard(conn)
                    conn.close(action.flush)
            elif kind is Connect:
                self._connect(action)
            elif kind is Hold or kind is Release:
                conn = conns.get(action.key)
                if conn is not None:
                    (conn.pause_reading if kind is Hold else conn.resume_reading)(PAUSE_HELD)
            elif kind is Send:
                if self.sender is not None:
                    self.sender.push_control(action.frame, action.key, action.service_id)
            elif kind is Log:
                logger.log(action.level, "%s", action.message)
            elif kind is Fatal:
                self.fatal = action.error
            elif kind is RestartSession:
                self.restart = action.error
                self.emit(ErrorEvent(action.error, fatal=False))
            elif kind is Listen or kind is StopListen:
                raise AssertionError("listen actions go through apply_async")
            else:
                if kind is TunnelReady and not self.ready:
                    self.ready = True
                    self.on_ready()
                self.emit(action)
        if not self._paused_writers:
            self.writers_drained.set()

    @staticmethod
    def needs_async(actions: list[Any]) -> bool:
        return any(action.__class__ is Listen or action.__class__ is StopListen for action in actions)

    async def apply_async(self, actions: list[Any]) -> None:
        for action in actions:
            if action.__class__ is Listen:
                await self._listen(action)
            elif action.__class__ is StopListen:
                for server in self._servers.pop(action.service_id, []):
                    server.close()
                self.ports.pop(action.service_id, None)
            else:
                self.apply([action])
            if self.fatal is not None:
                return

    async def _listen(self, action: Listen) -> None:
        service_id = action.service_id

        def factory() -> LocalConnection:
            return LocalConnection(self, service_id)

        try:
            servers, port = await listen(service_id, self.config.effective_bind_address, action.port, factory)
        except LocalProxyError as error:
            self.fatal = error
            return
        self._servers[service_id] = servers
        self.ports[service_id] = port
        self.emit(Listening(service_id, port))

    def _connect(self, action: Connect) -> None:
        settings = self.config.settings
        conn = LocalConnection(self, action.service_id, action.key)
        self._conns[action.key] = conn
        conn.start_connect(
            action.target,
            settings.tcp_connection_retry_count,
            settings.tcp_connection_retry_delay_ms / 1000,
            lambda ok: self._connect_done(conn, ok),
        )

    def _connect_done(self, conn: LocalConnection, ok: bool) -> None:
        if not ok and self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
            self._paused_writers.discard(conn)
            conn.close(False)
        self.apply(self.tunnel.connect_result(conn.key, ok))

    def _resume_reading(self, keys: list[int]) -> None:
        """The scheduler has room again for these connections' data."""
        conns = self._conns
        for key in keys:
            conn = conns.get(key)
            if conn is not None:
                conn.resume_reading(PAUSE_CONGESTED)

    # --- LocalHub: reports from local connections ----------------------------------------

    def local_opened(self, conn: LocalConnection) -> None:
        if self.config.mode is Mode.DESTINATION:
            return  # its key came with the Connect action
        logger.info(
            "Accepted tcp connection on port %s from %s", self.ports.get(conn.service_id, "?"), conn.peer
        )
        key, actions = self.tunnel.local_opened(conn.service_id)
        conn.key = key
        self._conns[key] = conn
        self.apply(actions)

    def local_data(self, conn: LocalConnection, data: bytes) -> None:
        self.bytes_sent[conn.service_id] += len(data)
        actions = self.tunnel.local_data(conn.key, data)
        if actions:
            self.apply(actions)

    def local_closed(self, conn: LocalConnection) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
            self._paused_writers.discard(conn)
            self.apply(self.tunnel.local_closed(conn.key))

    def writer_paused(self, conn: LocalConnection) -> None:
        self._paused_writers.add(conn)
        self.writers_drained.clear()

    def writer_resumed(self, conn: LocalConnection) -> None:
        self._paused_writers.discard(conn)
        if not self._paused_writers:
            self.writers_drained.set()
