"""Source listeners: listening sockets with the proxy's own accept loop (issue 22, item 5).

:func:`listen` opens one port on every address of the bind address; each socket
is a :class:`Listener`, whose accept loop logs running out of descriptors
(rate-limited, with what to raise) and resumes when some are free. Used by the
proxy's engine; :func:`exhaustion_advice` also by the destination's connects.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any, Callable

from localproxy.errors import ConfigError
from localproxy.ops.peerlog import PeerLog

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

__all__ = ["ACCEPT_RETRY", "BACKLOG", "Listener", "exhaustion_advice", "listen"]

logger = logging.getLogger("localproxy.adapters")  # the name the reference's lines always had

BACKLOG = 1024  # a burst of 1000 connects waits in the kernel, not refused
ACCEPT_BATCH = 100  # accepts per readiness event (as asyncio's loop)
ACCEPT_RETRY = 0.5  # seconds between accept attempts while out of descriptors


def exhaustion_advice(exc: OSError) -> str:
    """What to raise when ``exc`` says the process or system ran out of descriptors ("" if not)."""
    if exc.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource is not None else "the"
        return (
            f" (this process has all {soft} descriptors it may open in use: raise the limit, "
            "'ulimit -n' in the shell that starts it or LimitNOFILE= in its systemd unit)"
        )
    if exc.errno == errno.ENFILE:
        return " (the system's open file table is full: raise fs.file-max, or close other programs' files)"
    return ""


class Listener:
    """One listening socket with this module's accept loop.

    Neither event loop says when ``accept()`` fails for lack of descriptors:
    asyncio's hands EMFILE to the loop's exception handler (a traceback, no advice)
    and retries after 1 s; uvloop's libuv accepts and closes the waiting connections
    without a word (measured: 215 of 300 clients, no line at any level). Here the
    failure is logged (rate-limited) with what to raise, the connections wait in the
    kernel's backlog meanwhile, accepting resumes every :data:`ACCEPT_RETRY` s, and
    the first success after a failure is logged too.
    """

    def __init__(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], peer_log: PeerLog, name: str
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._peer_log = peer_log
        self._name = name
        self._retry: asyncio.TimerHandle | None = None
        self.failures = 0  # accepts that failed for lack of descriptors (episodes' sum)
        self._failing = False
        self._closed = False
        sock.setblocking(False)
        sock.listen(BACKLOG)
        self._loop.add_reader(sock.fileno(), self._accept)

    def getsockname(self) -> object:
        return self._sock.getsockname()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _accept(self) -> None:
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            if self._failing:
                self._failing = False
                self._peer_log.log(logger, logging.WARNING, "accept-resumed", "%s: accepting connections again", self._name)
            conn.setblocking(False)
            loop.create_task(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # out of resources for the transport, or the client left
            conn.close()
            self._peer_log.log(
                logger, logging.WARNING, "accept-setup", "%s: could not set up an accepted connection: %s%s",
                self._name, exc.strerror or exc, exhaustion_advice(exc),
            )

    def _accept_failed(self, exc: OSError) -> None:
        self.failures += 1
        self._failing = True
        self._peer_log.log(
            logger, logging.ERROR, "accept-failed",
            "%s: cannot accept a connection: %s%s; connections wait in the backlog, retrying every %g s",
            self._name, exc.strerror or exc, exhaustion_advice(exc), ACCEPT_RETRY,
        )
        # Linux keeps reporting the socket readable: stop watching it for a while.
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._accept()


def numeric_address_info(address: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo's answer for an IP literal (``-b 127.0.0.1``), at once; [] for a name.

    A numeric host needs no resolver: asking the loop would start its resolver thread
    (and a ``str`` host loads the idna codec), ~0.5 MiB an idle source keeps for nothing.
    """
    try:
        host = address.encode("ascii")  # bytes: getaddrinfo encodes no idna for them
        return socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
        )
    except (UnicodeEncodeError, OSError):  # a name (or not an address at all): the resolver says
        return []


async def listen(
    service_id: str,
    bind_address: str,
    port: int,
    factory: Callable[[], asyncio.Protocol],
    peer_log: PeerLog | None = None,
) -> tuple[list[Listener], int]:
    """Listen on every address of ``bind_address`` with one port (0: the first picks it)."""
    peer_log = peer_log or PeerLog()
    loop = asyncio.get_running_loop()
    name = service_id or "(default)"
    try:
        infos = numeric_address_info(bind_address, port) or await loop.getaddrinfo(
            bind_address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(
            f"Cannot resolve bind address '{bind_address}': {exc.strerror or exc}{exhaustion_advice(exc)}"
        ) from None
    servers: list[Listener] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                raise ConfigError(
                    f"Cannot listen on {bind_address} port {port} for service {name}: "
                    f"{exc.strerror or exc}{exhaustion_advice(exc)}"
                ) from None
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
            label = f"Port {port} ({name})" if service_id else f"Port {port}"
            servers.append(Listener(sock, factory, peer_log, label))
    except BaseException:
        for server in servers:
            server.close()
        raise
    if not servers:
        raise ConfigError(f"Cannot listen on {bind_address} for service {name}: no usable address")
    # (a peer can make a source listen and stop again by changing SERVICE_IDS: limited)
    peer_log.log(logger, logging.INFO, "listening", "Listening for new connection on port %d", port)
    return servers, port
