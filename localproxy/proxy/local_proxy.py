"""The library entry point: :class:`LocalProxy`.

``LocalProxy`` runs the session loop: connect with ``session.open_session``,
retry 5xx and network errors with ``Backoff`` (exponential, jittered, at most
``websocket.connect_retry_count`` times; -1 = forever), never retry a 4xx unless
``TokenSource.on_rejected`` rotated the token, and after a lost session close the
local connections and reconnect after ``websocket.retry_delay_ms``; but a
session the service closed because another proxy with the same token replaced
this one is reconnected after growing delays (two such proxies would otherwise
replace each other at every reconnect, many times a second). Each session
reads websocket messages, cuts them into frames (``FrameDecoder``), feeds the
sans-I/O :class:`~localproxy.tunnel.state.TunnelState` and hands its actions to the
:class:`~localproxy.proxy.engine.Engine` (local sockets, listeners, sender).

The websocket is not read while a local writer is over its high-water mark
(``adapters.WRITE_HIGH``): a local application that stops reading pauses the
session, as TCP would, and memory stays bounded.

Several proxies can run in one event loop: there is no global state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import socket
from typing import Any, Callable

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from localproxy.config.proxy_config import ProxyConfig, tunnel_label
from localproxy.errors import (
    ConnectionFailedError,
    HandshakeRejectedError,
    LocalProxyError,
    ServiceUnavailableError,
    TunnelNotReadyError,
    UnknownServiceError,
    UsageError,
)
from localproxy.events import Connected, Disconnected, ErrorEvent, Event
from localproxy.local.inprocess import socket_pair
from localproxy.ops.logs import log_tunnel
from localproxy.ops.stats import ProxyCounters, ProxyStats
from localproxy.proxy.engine import Engine
from localproxy.proxy.receiver import Receiver
from localproxy.tokens.source import TokenSource
from localproxy.tunnel.state import TunnelState
from localproxy.types import Mode
from localproxy.websocket.session import (
    DEFAULT_MAX_DELAY_MS,
    Backoff,
    SessionInfo,
    open_session,
)
from localproxy.wire.codec import MAX_FRAME_SIZE, FrameDecoder

__all__ = ["LocalProxy"]

logger = logging.getLogger("localproxy.proxy")

Subscriber = Callable[[Event], Any]

# The service closes a peer that a newer connection in the same mode replaced; the
# emulator says "replaced by a new connection", the real service's text is unknown.
_REPLACED_REASON = re.compile("replac", re.IGNORECASE)
# The first delay after being replaced, at least: a replaced proxy reconnecting at
# once would only kick out the proxy that replaced it (and be kicked out in turn).
REPLACED_MIN_DELAY_MS = 1000


class LocalProxy:
    """One local proxy (source or destination) as an async context manager::

    async with LocalProxy(config) as proxy:
        await proxy.ready           # services known (and listened on, in source mode)
        proxy.ports                 # {service id: local port} (source mode)
        await proxy.wait_closed()   # raises the fatal LocalProxyError, if any
    """

    def __init__(self, config: ProxyConfig, client_token: str | None = None, *, name: str | None = None) -> None:
        self.config = config
        self.name = name or tunnel_label(config)  # names the tunnel in stats and logs; never a token
        self._counters = ProxyCounters()
        self._ws: Any = None  # the current session's websocket (for its ping RTT)
        self._client_token = client_token
        self._subscribers: list[Subscriber] = []
        self._engine = Engine(config, TunnelState.from_config(config), self._emit)
        self._subprotocol: str | None = None
        self._fatal: LocalProxyError | None = None
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replaced = False  # the last session was closed as replaced by another proxy
        self._replaced_warned = False

    # --- public API ---------------------------------------------------------------

    async def __aenter__(self) -> "LocalProxy":
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting (``async with`` does it)."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        ready: asyncio.Future[None] = loop.create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        self._ready = ready

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        self._engine.on_ready = on_ready
        self._task = loop.create_task(self._run(), name=f"localproxy-{self.config.mode.value}")

    @property
    def ready(self) -> asyncio.Future[None]:
        """Done once the tunnel's services are known (and listened on, in source mode).

        Raises the fatal error if the proxy stops first; cancelled by ``close()``.
        """
        if self._ready is None:
            raise RuntimeError("LocalProxy is not started: use 'async with LocalProxy(...)'")
        return self._ready

    @property
    def stopped(self) -> bool:
        """True once the proxy stopped (closed, or a fatal error: ``wait_closed()`` raises it)."""
        return self._task is not None and self._task.done()

    @property
    def ports(self) -> dict[str, int]:
        """Source mode: service id (as in the tunnel; "" without services) -> bound port."""
        return dict(self._engine.ports)

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol of the current (or last) session."""
        return self._subprotocol

    def stats(self) -> ProxyStats:
        """A snapshot of this proxy's counters (see :mod:`localproxy.ops.stats`); call it in the loop."""
        engine = self._engine
        services = tuple(engine.tunnel.services or self.config.services)
        return self._counters.snapshot(
            self.name, self.config.mode.value, services=services, active=engine.tunnel.connections_by_service(),
            received=engine.bytes_received, sent=engine.bytes_sent, dropped=engine.tunnel.dropped, ws=self._ws,
        )

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    # --- in-process connections (source mode) -------------------------------------

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
        service_id = self._check_open(service)
        ours, theirs = socket_pair()
        try:
            await self._engine.attach(service_id, ours)
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

        For a program that accepted the socket itself (``localproxy connect``'s shared
        source hands over each attached Unix-socket client): the proxy reads and writes
        it directly, with no copy through another socket pair, and closes it at the end.
        Same checks and errors as :meth:`open_connection`; on an error ``sock`` is closed.
        """
        try:
            service_id = self._check_open(service)
            await self._engine.attach(service_id, sock)
        except BaseException:
            sock.close()
            raise

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

    async def wait_closed(self) -> None:
        """Return when the proxy stopped; raise its fatal error if it had one."""
        task = self._task
        if task is None:
            return
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        if self._fatal is not None:
            raise self._fatal

    async def close(self) -> None:
        """Close local connections and the websocket, stop listening."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    # --- the session loop -----------------------------------------------------------

    async def _run(self) -> None:
        config = self.config
        log_tunnel.set(self.name)  # this task's log records carry the tunnel (JSON logs)
        logger.info("Starting proxy in %s mode", config.mode.value)
        try:
            tokens = TokenSource(config, self._client_token)
            backoff = Backoff.from_settings(config.settings)
            # Not reset by a successful connect (a duel's reconnects all succeed): only
            # by a session that ends for another reason.
            replaced_backoff = Backoff(
                max(config.settings.retry_delay_ms, REPLACED_MIN_DELAY_MS), DEFAULT_MAX_DELAY_MS
            )
            while True:
                try:
                    ws, info = await open_session(
                        config, access_token=tokens.access_token, client_token=tokens.client_token
                    )
                except (ServiceUnavailableError, ConnectionFailedError) as error:
                    self._counters.on_connect_error(error)
                    await self._retry_later(backoff, error)
                    continue
                except HandshakeRejectedError as error:
                    self._counters.on_connect_error(error)
                    if await tokens.on_rejected(error):
                        continue
                    raise
                backoff.reset()
                reason = await self._run_session(ws, info)
                if self._engine.fatal is not None:
                    raise self._engine.fatal
                if self._replaced:
                    await self._wait_after_replaced(replaced_backoff)
                    continue
                replaced_backoff.reset()
                await self._retry_later(
                    backoff, ConnectionFailedError(f"The websocket session ended: {reason}")
                )
        except LocalProxyError as error:
            self._fatal = error
            self._emit(ErrorEvent(error, fatal=True))
            self._fail_ready(error)
        except Exception as error:  # a bug: let wait_closed() and ready raise it
            self._fail_ready(error)
            raise
        finally:
            if self._ready is not None and not self._ready.done():
                self._ready.cancel()
            self._engine.shutdown()

    def _fail_ready(self, error: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)

    async def _retry_later(self, backoff: Backoff, error: LocalProxyError) -> None:
        delay = backoff.next_delay()
        if delay is None:
            raise ConnectionFailedError(
                f"Giving up after {backoff.attempts} retries (websocket.connect_retry_count): {error}"
            )
        logger.warning("%s; retrying in %.2f s", error, delay)
        self._emit(ErrorEvent(error, fatal=False))
        await asyncio.sleep(delay)

    async def _wait_after_replaced(self, backoff: Backoff) -> None:
        delay = backoff.next_delay()
        assert delay is not None  # no retry count: never gives up
        if not self._replaced_warned:
            self._replaced_warned = True
            mode = self.config.mode.value
            logger.warning(
                "Another local proxy connected with this tunnel's %s token and replaced this one; "
                "two local proxies are sharing one %s token (and client token), and each one's "
                "reconnect replaces the other. Stop one of them (or give each its own tunnel). "
                "Reconnecting in %.2f s, then after growing delays while this goes on",
                mode,
                mode,
                delay,
            )
        else:
            logger.info("Replaced again by another local proxy; reconnecting in %.2f s", delay)
        error = ConnectionFailedError("Replaced by another local proxy with the same token")
        self._emit(ErrorEvent(error, fatal=False))
        await asyncio.sleep(delay)

    async def _run_session(self, ws: Any, info: SessionInfo) -> str:
        """Serve one websocket until it ends; returns why it ended."""
        self._subprotocol = info.subprotocol
        self._emit(Connected(info.channel_id, info.subprotocol))
        settings = self.config.settings
        decoder = FrameDecoder(min(settings.max_size - 1, MAX_FRAME_SIZE), settings.max_payload_size)
        engine = self._engine
        tunnel = engine.tunnel
        engine.session_started(ws)
        self._ws = ws
        reason = "closed"
        self._replaced = False
        receiver = Receiver(ws, engine, decoder)
        try:
            await receiver.start(tunnel.session_started(info.subprotocol))
            await receiver.done
            if engine.fatal is not None or engine.restart is not None:
                reason = str(engine.fatal or engine.restart)
            else:
                protocol = ws.protocol
                reason = getattr(ws, "dead_reason", None) or _close_reason(protocol.close_rcvd, protocol.close_sent)
                # Only a close frame the service sent says so (not one this proxy sent).
                rcvd = protocol.close_rcvd
                self._replaced = rcvd is not None and bool(_REPLACED_REASON.search(rcvd.reason))
        except ConnectionClosed as closed:  # a send while the session's first actions ran
            reason = getattr(ws, "dead_reason", None) or _close_reason(closed.rcvd, closed.sent)
        finally:
            receiver.stop()
            self._ws = None
            engine.session_ended()
            try:
                await asyncio.shield(ws.close())
            except Exception:  # noqa: BLE001 - already broken: nothing more to close
                pass
            logger.info("Websocket session with %s ended: %s", self.config.endpoint.url, reason)
            self._emit(Disconnected(reason))
        return reason

    def _emit(self, event: Event) -> None:
        self._counters.on_event(event)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a subscriber's bug must not stop the proxy
                logger.exception("Event subscriber %r failed", callback)


def _close_reason(rcvd: Close | None, sent: Close | None) -> str:
    frame = rcvd or sent
    if frame is None:
        return "connection lost"
    return f"code {frame.code}" + (f" ({frame.reason})" if frame.reason else "")
