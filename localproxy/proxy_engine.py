"""Carrying out the tunnel's actions: the websocket sender and the local side hub.

:class:`Engine` is what a :class:`~localproxy.proxy.LocalProxy` session loop
hands the sans-I/O tunnel's actions to, and what every local connection reports
to (it implements :class:`~localproxy.adapters.LocalHub`). It lives as long as
the proxy (listeners survive reconnects); a :class:`Sender` lives for one session.

Send path: frames queue up in the session's :class:`Sender`, whose task joins
the ready ones into websocket messages of at most 131076 bytes, whole frames only
(one ``ws.send`` each; websockets waits while its write buffer is over
``write_limit``). While the queue holds more than ``SEND_HIGH`` bytes every local
socket stops being read, until it is back under ``SEND_LOW``: memory stays
bounded and a fast local application is slowed to the websocket's pace.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

from websockets.exceptions import ConnectionClosed

from .adapters import PAUSE_CONGESTED, PAUSE_HELD, LocalConnection, listen
from .codec import MAX_WS_MESSAGE, BytesLike
from .config import Mode, ProxyConfig
from .errors import LocalProxyError
from .events import ErrorEvent, Event, Listening, TunnelReady
from .tunnel import TunnelState
from .tunnel_actions import (
    Close,
    Connect,
    Fatal,
    Hold,
    Listen,
    Log,
    Release,
    RestartSession,
    Send,
    StopListen,
    Write,
)

__all__ = ["Engine", "SEND_HIGH", "SEND_LOW", "Sender"]

logger = logging.getLogger("localproxy.proxy")

SEND_HIGH = 512 * 1024
SEND_LOW = 128 * 1024


class Sender:
    """The websocket writer of one session: queued frame parts -> batched messages."""

    def __init__(self, ws: Any, on_congestion: Callable[[bool], None]) -> None:
        self._ws = ws
        self._queue: deque[tuple[int, BytesLike | list[BytesLike]]] = deque()  # (size, frame parts)
        self._bytes = 0
        self._wakeup = asyncio.Event()
        self._congested = False
        self._on_congestion = on_congestion
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, parts: list[BytesLike]) -> None:
        """Queue the parts of whole frames (a control frame, or DATA header + payload)."""
        queue = self._queue
        total = 0
        index = 0
        count = len(parts)
        while index < count:
            first = parts[index]
            index += 1
            size = len(first)
            # A frame's parts stay together so that no message ends mid-frame: the
            # receivers (service, peer proxy) then never reassemble a split frame.
            need = ((first[0] << 8) | first[1]) + 2
            if size >= need or index == count:
                queue.append((size, first))
            else:
                group = [first]
                while size < need and index < count:
                    part = parts[index]
                    index += 1
                    group.append(part)
                    size += len(part)
                queue.append((size, group))
            total += size
        self._bytes += total
        self._wakeup.set()
        if self._bytes > SEND_HIGH and not self._congested:
            self._congested = True
            self._on_congestion(True)

    async def _run(self) -> None:
        queue = self._queue
        ws = self._ws
        try:
            while True:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                size, first = queue.popleft()
                data: BytesLike
                # mypy cannot narrow where a `__class__ is list` test is false (a subclass
                # could pass), so the three ignores below say "BytesLike here".
                if first.__class__ is not list and not (queue and size + queue[0][0] <= MAX_WS_MESSAGE):
                    data = first  # type: ignore[assignment]
                else:
                    batch: list[BytesLike] = first if first.__class__ is list else [first]  # type: ignore[list-item]
                    while queue and size + queue[0][0] <= MAX_WS_MESSAGE:
                        frame_size, frame = queue.popleft()
                        size += frame_size
                        if frame.__class__ is list:
                            batch.extend(frame)
                        else:
                            batch.append(frame)  # type: ignore[arg-type]
                    data = b"".join(batch)
                self._bytes -= size
                if self._congested and self._bytes <= SEND_LOW:
                    self._congested = False
                    self._on_congestion(False)
                await ws.send(data)
        except ConnectionClosed:
            pass  # the receive loop sees it too and ends the session
        except Exception:  # noqa: BLE001 - a bug: end the session rather than hang
            logger.exception("Websocket sender failed")
            await ws.close(1011, "internal error")

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
        self._congested = False

    @property
    def paused_writers(self) -> frozenset[LocalConnection]:
        return frozenset(self._paused_writers)

    # --- sessions ------------------------------------------------------------------

    def session_started(self, ws: Any) -> None:
        self.restart = None
        self.sender = Sender(ws, self.set_congested)

    def session_ended(self) -> None:
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        self.apply(self.tunnel.session_lost())
        self.set_congested(False)

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
            if kind is Send:
                if self.sender is not None:
                    self.sender.send(action.parts)
            elif kind is Write:
                conn = conns.get(action.key)
                if conn is not None:
                    conn.write(action.data)
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
            return LocalConnection(self, service_id, read_paused=PAUSE_CONGESTED if self._congested else 0)

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
        conn = LocalConnection(
            self, action.service_id, action.key, read_paused=PAUSE_CONGESTED if self._congested else 0
        )
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

    def set_congested(self, congested: bool) -> None:
        """The sender's queue crossed a mark: stop or resume reading every local socket."""
        if congested == self._congested:
            return
        self._congested = congested
        for conn in self._conns.values():
            if congested:
                conn.pause_reading(PAUSE_CONGESTED)
            else:
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
