"""A small HTTP/1.1 GET server on the event loop, bounded for hostile clients.

The metrics exporter used prometheus_client's ``start_http_server``: a thread per
connection and no header timeout, so 94 idle connections held 100 threads.
This one runs in the program's own event loop (no thread at all) and bounds
everything a client controls:

- the request head: :data:`MAX_REQUEST_HEAD` bytes, else 431 and close;
- time: a connection must complete each request head within
  :data:`HEADER_TIMEOUT` seconds (a keep-alive connection waiting for its next
  request too), and read its answer within the same time, else it is closed;
- connections: at most :data:`MAX_CONNECTIONS`; one more closes the connection
  that has waited longest for a request head (an idle one: a scraper that is
  being answered is never cut), or, if none is idle, the newcomer.

Only ``GET`` and ``HEAD`` without a body: a handler maps (path, headers) to a reply.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

__all__ = [
    "HEADER_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "BoundedHttpServer",
    "HttpReply",
    "listening_socket",
]

logger = logging.getLogger("localproxy.metrics")

MAX_CONNECTIONS = 16  # scrapers are one or two Prometheus servers
HEADER_TIMEOUT = 10.0  # seconds for a request head, and for reading the answer
MAX_REQUEST_HEAD = 8192

# (status, headers, body); headers without Content-Length, Date, Connection (added here).
HttpReply = tuple[int, list[tuple[str, str]], bytes]
# (path with query, lower-case header names -> values) -> reply
Handler = Callable[[str, dict[str, str]], HttpReply]


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound now (``OSError`` if it cannot be)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    idle_since: float | None = field(default=None)  # loop time; None while answering


class BoundedHttpServer:
    """Serve ``handler`` on an already listening socket, in the running loop."""

    def __init__(self, sock: socket.socket, handler: Handler, *, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        self._sock = sock
        self._handler = handler
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self._connections: list[_Connection] = []
        self._server: asyncio.Server | None = None
        self.evicted = 0  # idle connections closed to admit a new one
        self.refused = 0  # new connections closed because every slot was busy answering

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=MAX_REQUEST_HEAD)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        for connection in list(self._connections):
            connection.writer.transport.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.header_timeout)
        if server is not None:
            await server.wait_closed()
        else:
            self._sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if len(self._connections) >= self.max_connections and not self._evict_one():
            self.refused += 1
            writer.transport.abort()
            return
        connection = _Connection(writer, asyncio.current_task(), loop.time())
        self._connections.append(connection)
        try:
            await self._requests(reader, connection)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client left, stalled, or sent too much: nothing to tell anyone
        finally:
            if connection in self._connections:  # not if evicted
                self._connections.remove(connection)
            writer.close()

    def _evict_one(self) -> bool:
        idle = [c for c in self._connections if c.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since or 0.0)
        oldest.writer.transport.abort()  # its task ends on the lost connection
        self._connections.remove(oldest)
        self.evicted += 1
        if self.evicted == 1 or self.evicted % 1000 == 0:
            logger.warning(
                "Metrics server: closed an idle connection to admit a new one (%d connections at most; "
                "%d closed so far)", self.max_connections, self.evicted,
            )
        return True

    async def _requests(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        writer = connection.writer
        while True:
            connection.idle_since = loop.time()
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
            except asyncio.LimitOverrunError:
                await self._reply(writer, (431, [], b"Request header fields too large\n"), False, False)
                return
            except asyncio.IncompleteReadError:
                return
            connection.idle_since = None
            request = _parse_head(head)
            if request is None:
                await self._reply(writer, (400, [], b"Bad request\n"), False, False)
                return
            method, target, version, headers = request
            if "content-length" in headers or "transfer-encoding" in headers:
                await self._reply(writer, (400, [], b"A GET request has no body\n"), False, False)
                return
            if method not in ("GET", "HEAD"):
                reply: HttpReply = (405, [("Allow", "GET, HEAD")], b"Only GET and HEAD\n")
            else:
                reply = self._handler(target, headers)
            token = headers.get("connection", "").lower()
            keep_alive = token != "close" if version == "HTTP/1.1" else token == "keep-alive"
            await self._reply(writer, reply, keep_alive, method == "HEAD")
            if not keep_alive:
                return

    async def _reply(self, writer: asyncio.StreamWriter, reply: HttpReply, keep_alive: bool, head_only: bool) -> None:
        status, headers, body = reply
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{n}: {v}" for n, v in headers),
                 f"Content-Length: {len(body)}", f"Date: {formatdate(usegmt=True)}"]
        if not keep_alive:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        # A client that does not read its answer holds a slot for this long at most.
        await asyncio.wait_for(writer.drain(), self.header_timeout)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]] | None:
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers
