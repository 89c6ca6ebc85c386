"""The local side: source listeners, destination connectors, per-connection pumps.

Every local connection is one :class:`LocalConnection` (an ``asyncio.Protocol``):
bytes read go straight to its :class:`LocalHub` (the proxy, which frames them
for the tunnel) from ``data_received``, bytes for it are ``transport.write``-n.
No task per chunk; one task per destination connect attempt.

Flow control (why these numbers):

- Local -> tunnel: the hub pauses *reading* every local connection while the
  websocket's outgoing queue is above its high-water mark (see ``proxy.py``);
  a TCP socket we do not read pushes back on its application, as TCP does.
- Tunnel -> local: each connection's write buffer has a high-water mark of
  ``WRITE_HIGH`` (1 MiB; ``WRITE_LOW`` 256 KiB to resume). Above it the
  connection is backlogged; the hub's receive policy (``receive_policy.py``)
  stops reading the websocket only when the backlogged connections together
  hold more than a budget, and resets one that keeps it stopped too long. The
  protocol has no per-stream window, so the alternatives would be unbounded
  buffering or dropping data.
- A flushed close (``close(flush=True)``) writes what is queued, then closes; a
  reader that never drains it is aborted after ``FLUSH_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Protocol, cast

from localproxy.errors import ConfigError
from localproxy.types import DestinationTarget
from localproxy.wire.codec import BytesLike

__all__ = [
    "BACKLOG",
    "FLUSH_TIMEOUT",
    "WRITE_HIGH",
    "WRITE_LOW",
    "LocalConnection",
    "LocalHub",
    "connect_local",
    "listen",
]

logger = logging.getLogger("localproxy.adapters")

WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
BACKLOG = 1024  # a burst of 1000 connects waits in the kernel, not refused
FLUSH_TIMEOUT = 30.0

# Reasons for not reading a local socket; reading resumes when none is left.
PAUSE_HELD = 1  # V1/V2 peer: waits for the current stream of its service to end
PAUSE_CONGESTED = 2  # the websocket's outgoing queue is full


class LocalHub(Protocol):
    """What a :class:`LocalConnection` reports to (implemented by the proxy)."""

    def local_opened(self, conn: "LocalConnection") -> None: ...
    def local_data(self, conn: "LocalConnection", data: bytes) -> None: ...
    def local_closed(self, conn: "LocalConnection") -> None: ...
    def writer_paused(self, conn: "LocalConnection") -> None: ...
    def writer_resumed(self, conn: "LocalConnection") -> None: ...


class LocalConnection(asyncio.Protocol):
    """One local TCP/Unix connection, accepted (source) or opened (destination)."""

    def __init__(
        self, hub: LocalHub, service_id: str, key: int = 0, *, read_paused: int = 0, origin: str = "tcp"
    ) -> None:
        self.hub = hub
        self.service_id = service_id
        self.key = key  # the tunnel's connection key (source: set by hub.local_opened)
        # How a source connection came: "tcp", "unix" (a Unix socket listener) or
        # "in-process" (LocalProxy.open_connection): for logs only.
        self.origin = origin
        self.peer = ""  # remote address, for logs
        self.transport: asyncio.Transport | None = None
        self.closing = False  # the hub closed it: do not report the close back
        self.reported = False  # local_closed already told to the hub
        self.write_paused = False
        self._read_paused = read_paused
        self._pending: list[BytesLike] = []  # writes before the destination connect succeeded
        self._pending_bytes = 0
        self._connector: asyncio.Task[None] | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        _set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if self.origin == "tcp":
            peer = transport.get_extra_info("peername")
            self.peer = _format_address(peer) if peer else self.service_id or "local socket"
        else:
            self.peer = f"{self.origin} connection to {self.service_id or '(default)'}"
        if self._read_paused:
            transport.pause_reading()
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            transport.writelines(pending)
            if self.write_paused and transport.get_write_buffer_size() <= WRITE_HIGH:
                self.resume_writing()  # paused while connecting; the transport will not tell
        self.hub.local_opened(self)

    def data_received(self, data: bytes) -> None:
        if not self.closing:
            self.hub.local_data(self, data)

    def eof_received(self) -> bool:
        # No half-close in the tunnel protocol: the peer's reset follows our EOF at
        # once (as the reference does). Returning False closes after flushing writes.
        self._report_closed()
        return False

    def pause_writing(self) -> None:
        # A closing connection gets no more data: its flush must not pause the session.
        if not self.write_paused and not self.closing:
            self.write_paused = True
            self.hub.writer_paused(self)

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            self.hub.writer_resumed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self.transport = None
        if self.write_paused:
            self.resume_writing()
        self._report_closed()

    # --- driven by the hub --------------------------------------------------------

    def buffered(self) -> int:
        """Bytes written to this connection that its application has not taken yet."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else self._pending_bytes

    def write(self, data: BytesLike) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)
        elif not self.closing:  # destination still connecting: keep it, in order
            self._pending.append(data if data.__class__ is bytes else bytes(data))
            self._pending_bytes += len(self._pending[-1])
            if self._pending_bytes > WRITE_HIGH:
                self.pause_writing()

    def close(self, flush: bool = True) -> None:
        """Close on the tunnel's request (the hub already knows): flush or abort."""
        if self.closing:
            return
        self.closing = True
        self.reported = True
        if self._connector is not None:
            self._connector.cancel()
        transport = self.transport
        if transport is None:
            self._pending.clear()
            if self.write_paused:
                self.resume_writing()
            return
        logger.info("Disconnected from: %s", self.peer)
        if flush and transport.get_write_buffer_size():
            transport.close()
            self._abort_timer = asyncio.get_running_loop().call_later(FLUSH_TIMEOUT, transport.abort)
        elif flush:
            transport.close()
        else:
            transport.abort()

    def pause_reading(self, reason: int) -> None:
        was = self._read_paused
        self._read_paused |= reason
        if not was and self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_reading(self, reason: int) -> None:
        if not self._read_paused & reason:
            return
        self._read_paused &= ~reason
        if not self._read_paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def start_connect(
        self, target: DestinationTarget, retries: int, delay: float, done: Callable[[bool], None]
    ) -> None:
        """Destination: connect in a task; ``done(ok)`` after success or the last retry."""
        self._connector = asyncio.get_running_loop().create_task(self._connect(target, retries, delay, done))

    async def _connect(
        self, target: DestinationTarget, retries: int, delay: float, done: Callable[[bool], None]
    ) -> None:
        ok = await connect_local(self, target, retries, delay)
        self._connector = None
        if not self.closing:
            done(ok)

    def _report_closed(self) -> None:
        if not self.reported:
            self.reported = True
            if self.key:
                logger.info("Disconnected from: %s", self.peer)
            self.hub.local_closed(self)


async def connect_local(conn: LocalConnection, target: DestinationTarget, retries: int, delay: float) -> bool:
    """Connect ``conn`` to ``target``, trying ``1 + retries`` times ``delay`` s apart."""
    loop = asyncio.get_running_loop()
    attempts = 1 + max(retries, 0)
    for attempt in range(1, attempts + 1):
        logger.info("Attempting to establish tcp socket connection to: %s", target)
        try:
            if target.unix_path is not None:
                await loop.create_unix_connection(lambda: conn, target.unix_path)
            else:
                await loop.create_connection(lambda: conn, target.host or "localhost", target.port or 0)
            return True
        except OSError as exc:
            level = logging.WARNING if attempt < attempts else logging.ERROR
            logger.log(
                level,
                "Could not connect to %s (attempt %d of %d): %s",
                target,
                attempt,
                attempts,
                exc.strerror or exc,
            )
        if attempt < attempts:
            await asyncio.sleep(delay)
    return False


async def listen(
    service_id: str,
    bind_address: str,
    port: int,
    factory: Callable[[], asyncio.Protocol],
) -> tuple[list[asyncio.Server], int]:
    """Listen on every address of ``bind_address`` with one port (0: the first picks it)."""
    loop = asyncio.get_running_loop()
    name = service_id or "(default)"
    try:
        infos = await loop.getaddrinfo(bind_address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"Cannot resolve bind address '{bind_address}': {exc.strerror or exc}") from None
    servers: list[asyncio.Server] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port) + tuple(address[2:]))
            except OSError as exc:
                sock.close()
                if servers:  # a second address family is a bonus, not a must
                    logger.debug("Not listening on %s port %d too: %s", address[0], port, exc.strerror or exc)
                    continue
                raise ConfigError(
                    f"Cannot listen on {bind_address} port {port} for service {name}: {exc.strerror or exc}"
                ) from None
            seen.add((family, address[0]))
            port = sock.getsockname()[1]
            servers.append(await loop.create_server(factory, sock=sock, backlog=BACKLOG))
    except BaseException:
        for server in servers:
            server.close()
        raise
    if not servers:
        raise ConfigError(f"Cannot listen on {bind_address} for service {name}: no usable address")
    logger.info("Listening for new connection on port %d", port)
    return servers, port


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - closed under us
            pass


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "local socket"
