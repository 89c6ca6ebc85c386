"""In-process connections of a source :class:`~localproxy.proxy.local_proxy.LocalProxy`.

``open_connection`` (asyncio streams) and ``connect_socket`` (a blocking socket,
for libraries such as paramiko) hand the caller one end of a socket pair whose
other end the engine serves as it serves an accepted TCP client
(:mod:`localproxy.local.inprocess`): same scheduler, fairness, backpressure and
close semantics, with or without a listener for the service (``InProcess()``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    LocalProxyError,
    TunnelNotReadyError,
    UnknownServiceError,
    UsageError,
)
from localproxy.local.inprocess import socket_pair
from localproxy.proxy.engine import Engine
from localproxy.types import Mode

__all__ = ["InProcessConnections"]


class InProcessConnections:
    """Mixed into LocalProxy, whose state it reads."""

    config: ProxyConfig
    _engine: Engine
    _task: asyncio.Task[None] | None
    _loop: asyncio.AbstractEventLoop | None
    _fatal: LocalProxyError | None

    async def open_connection(
        self, service: str | None = None, *, limit: int = 2**16
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to ``service`` through the tunnel, as asyncio streams.

        Source mode only; ``service`` is a tunnel service id (None: the tunnel's only
        service). The connection is served as a TCP client of a source listener is
        (same fairness, backpressure and close: ``writer.write_eof()`` or ``close()``
        ends it, the far end closing gives EOF), whether the service has a listener
        or is ``InProcess()``. Raises ``UsageError`` (not source mode),
        ``UnknownServiceError``, ``TunnelNotReadyError`` (no session now, or closed),
        or the proxy's fatal error if it stopped on one.
        """
        theirs = await self._open_socket(service)
        try:
            theirs.setblocking(False)  # _open_socket hands out a blocking socket
            return await asyncio.open_connection(sock=theirs, limit=limit)
        except BaseException:
            theirs.close()
            raise

    def connect_socket(self, service: str | None = None, *, timeout: float = 30.0) -> socket.socket:
        """A new connection to ``service`` as a connected, blocking socket (paramiko's ``sock=``).

        Same checks, errors and semantics as :meth:`open_connection`; close the socket
        to end the connection. Call it from any thread: from another thread it waits
        (at most ``timeout`` s) until the proxy's loop serves the connection; on the
        loop's own thread it does not block (the loop serves the connection as soon
        as the caller yields), but the caller must then not do blocking I/O on that
        socket from the loop's thread (it would wait on itself): hand the socket to
        a thread, e.g. ``await asyncio.to_thread(work, sock)``.
        """
        loop = self._loop
        if loop is None:
            raise TunnelNotReadyError("The proxy is not started: use 'async with LocalProxy(...)' first")
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            future = asyncio.run_coroutine_threadsafe(self._open_socket(service), loop)
            try:
                return future.result(timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise TunnelNotReadyError(
                    f"The proxy's event loop did not serve the connection within {timeout} s"
                ) from None
        service_id = self._check_open(service)
        ours, theirs = socket_pair()
        attaching = loop.create_task(self._engine.attach(service_id, ours))
        # A failure closes ours, which the caller sees as EOF; retrieve it (no warning).
        attaching.add_done_callback(lambda task: task.cancelled() or task.exception())
        theirs.setblocking(True)
        return theirs

    async def attach_socket(self, sock: socket.socket, service: str | None = None) -> None:
        """Serve an already-connected stream socket as a new connection to ``service``.

        For a program that accepted the socket itself (e.g. ``localproxy connect``'s
        shared source hands over each client of its private Unix socket): the proxy
        reads and writes it directly, with no copy through a socket pair, and closes
        it at the end. Same checks and errors as :meth:`open_connection`; on an error
        ``sock`` is closed.
        """
        try:
            service_id = self._check_open(service)
            await self._engine.attach(service_id, sock)
        except BaseException:
            sock.close()
            raise

    async def serve_stdio(self, service: str | None = None, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        """One connection to ``service`` over ``stdin_fd``/``stdout_fd``; returns when it ends.

        Where the loop can watch both descriptors, they are the connection's own
        transport (no relay); elsewhere (Windows, files, one socket for both)
        :func:`~localproxy.local.stdio.relay_stdio` copies between them and an
        :meth:`open_connection`. Same checks and errors as :meth:`open_connection`.
        """
        service_id = self._check_open(service)
        served = await self._engine.attach_stdio(service_id, stdin_fd, stdout_fd)
        if served is None:
            reader, writer = await self.open_connection(service)
            # Imported here: a proxy that never relays stdio does not load it (start-up, memory).
            from localproxy.local.stdio import relay_stdio

            await relay_stdio(reader, writer, stdin_fd=stdin_fd, stdout_fd=stdout_fd)
            return
        transport, restore = served
        try:
            await asyncio.shield(transport.closed)
        finally:
            if not transport.closed.done():
                transport.abort()  # cancelled: the connection ends with us
                await asyncio.wait([transport.closed], timeout=5.0)
            restore()

    async def _open_socket(self, service: str | None) -> socket.socket:
        service_id = self._check_open(service)
        ours, theirs = socket_pair()
        try:
            await self._engine.attach(service_id, ours)
        except BaseException:
            theirs.close()
            raise
        theirs.setblocking(True)
        return theirs

    def _check_open(self, service: str | None) -> str:
        """The served service id for a new in-process connection, or a typed error."""
        if self.config.mode is not Mode.SOURCE:
            raise UsageError(
                f"In-process connections need a source-mode proxy; this one is in {self.config.mode.value} mode"
            )
        task = self._task
        if task is None:
            raise TunnelNotReadyError("The proxy is not started: use 'async with LocalProxy(...)' first")
        if task.done():
            if self._fatal is not None:
                raise self._fatal
            raise TunnelNotReadyError("The proxy is closed")
        tunnel = self._engine.tunnel
        services = tunnel.services
        if services is None:
            raise TunnelNotReadyError("The tunnel is not ready yet (its services are not known): await proxy.ready")
        service_id = tunnel.served_service(service)
        if service_id is None:
            shown = ", ".join(repr(name) for name in services)
            if service is None:
                raise UnknownServiceError(f"The tunnel serves several services ({shown}): name one")
            raise UnknownServiceError(f"The tunnel does not serve service {service!r} here (it serves: {shown})")
        if not tunnel.session_active:
            raise TunnelNotReadyError("The tunnel session is down (reconnecting): try again after it is back")
        return service_id
