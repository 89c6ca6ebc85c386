"""Carrying out the tunnel's actions: the websocket sender and the local side hub.

:class:`Engine` is what a :class:`~localproxy.proxy.local_proxy.LocalProxy` session loop
hands the sans-I/O tunnel's actions to, and what every local connection reports
to (it implements :class:`~localproxy.local.adapters.LocalHub`). It lives as long as
the proxy (listeners survive reconnects); a :class:`Sender` lives for one session.

Send path: frames wait in the session's :class:`~localproxy.tunnel.scheduler.SendScheduler`
(one queue per local connection, fair and order-safe); the :class:`Sender` task
takes one websocket message at a time from it, of the size the
:class:`~localproxy.tunnel.pacing.Pacer` allows, and keeps what sits below it small
(websockets' write buffer and the kernel's unsent bytes, ``TCP_NOTSENT_LOWAT``),
so that the queue lives where it can be reordered (``sender.py``). A connection
whose own queue is full stops being read (``PAUSE_CONGESTED``) until the
scheduler resumes it; the others go on being read.

Receive path: local writers over their high-water mark are *backlogged*; the
:class:`~localproxy.tunnel.receive_policy.ReceiveGate` says when the websocket must stop
being read (their bytes together over a budget) and which stalled connection to
reset when that lasts too long.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from typing import Any, Callable

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import LocalProxyError
from localproxy.events import ErrorEvent, Event, Listening, TunnelReady
from localproxy.local.adapters import (
    PAUSE_CONGESTED,
    PAUSE_HELD,
    LocalConnection,
    listen,
)
from localproxy.local.inprocess import serve_socket
from localproxy.tunnel.actions import (
    Close,
    Connect,
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
from localproxy.tunnel.receive_policy import ReceiveGate
from localproxy.tunnel.state import TunnelState
from localproxy.types import Mode
from localproxy.websocket.sender import Sender

__all__ = ["Engine"]

logger = logging.getLogger("localproxy.proxy")

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
        # Set while the websocket may be read (see receive_policy.py); the name is historic.
        self.writers_drained = asyncio.Event()
        self.writers_drained.set()
        settings = config.settings
        self._gate = ReceiveGate(settings.receive_budget_bytes, settings.stalled_reader_timeout_ms / 1000)
        self._gate_timer: asyncio.TimerHandle | None = None
        self._gating = False
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
        self._reconsider_reading()

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
        if self._paused_writers or not self.writers_drained.is_set():
            self._reconsider_reading()

    @staticmethod
    def needs_async(actions: list[Any]) -> bool:
        for action in actions:  # (a loop: a generator costs more, once per message)
            if action.__class__ is Listen or action.__class__ is StopListen:
                return True
        return False

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

    async def attach(self, service_id: str, sock: socket.socket) -> None:
        """Serve ``sock`` as a new local connection of ``service_id`` (in-process source)."""
        await serve_socket(sock, lambda: LocalConnection(self, service_id, origin="in-process"))

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
        if conn.origin == "tcp":
            logger.info(
                "Accepted tcp connection on port %s from %s", self.ports.get(conn.service_id, "?"), conn.peer
            )
        else:
            logger.info("Accepted %s", conn.peer)
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
        self._reconsider_reading()

    def writer_resumed(self, conn: LocalConnection) -> None:
        self._paused_writers.discard(conn)
        self._reconsider_reading()

    # --- receive policy ------------------------------------------------------------------

    POLL_WHILE_STOPPED = 0.1  # seconds between looks at the backlogs while not reading

    def _reconsider_reading(self) -> None:
        """Ask the receive gate whether to read the websocket; reset whom it names."""
        if self._gating:
            return  # a reset below re-enters through apply(): the loop here covers it
        self._gating = True
        try:
            loop = asyncio.get_running_loop()
            for _ in range(len(self._paused_writers) + 1):
                backlogs = {conn.key: conn.buffered() for conn in self._paused_writers}
                decision = self._gate.update(backlogs, loop.time())
                if decision.reset is None:
                    break
                self._reset_stalled(decision.reset, decision.stalled_for, backlogs[decision.reset])
        finally:
            self._gating = False
        if self._gate.reading:
            self.writers_drained.set()
            if self._gate_timer is not None:
                self._gate_timer.cancel()
                self._gate_timer = None
        else:
            self.writers_drained.clear()
            if self._gate_timer is None:
                self._gate_timer = loop.call_later(self.POLL_WHILE_STOPPED, self._poll_gate)

    def _poll_gate(self) -> None:
        self._gate_timer = None
        self._reconsider_reading()

    def _reset_stalled(self, key: int, stalled_for: float, buffered: int) -> None:
        conn = self._conns.pop(key, None)
        if conn is None:
            return
        self._paused_writers.discard(conn)
        logger.warning(
            "Local connection %s of service '%s' took no data for %.1f s while %d bytes waited for it, "
            "and the tunnel stopped reading for all connections meanwhile: resetting it so the others "
            "can continue (tunneling.proxy.tcp.stalled_reader_timeout_ms)",
            conn.peer,
            conn.service_id or "(default)",
            stalled_for,
            buffered,
        )
        conn.close(False)
        self.apply(self.tunnel.local_closed(key))
