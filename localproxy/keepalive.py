"""Websocket keepalive and dead-link detection (PROTOCOL.md 4.6).

The proxy pings the service every ``websocket.ping_period_ms`` (20 s by default:
under the ~60 s after which the service's load balancer, or a NAT, drops an idle
connection). A link can also die without a FIN or RST (a cellular handover, a NAT
that forgot the mapping, a middlebox that stops forwarding): TCP then waits for
many minutes while the tunnel looks up. :class:`Liveness` decides when such a
websocket is dead:

- Any bytes received prove the link is alive, not only pongs: a pong can wait
  behind a large download, and data frames are better proof than a pong.
- The service may not answer pings before the peer connects (PROTOCOL.md 4.6),
  so silence alone is no proof of a dead link: a healthy session whose peer is
  absent can receive nothing for hours. The watchdog is *armed* by the first
  pong of the session: a service that answered once and then stays silent for
  ``DEAD_AFTER_PERIODS`` ping periods (while pings keep going out) is gone. If
  the real service stopped answering after the peer left, this costs one
  reconnect (with the client token, so it works), and the new session starts
  unarmed: no reconnect loop.
- While the proxy itself does not read the websocket (a slow local reader pauses
  it), nothing can arrive: that time does not count.

:class:`Liveness` is sans-I/O; :class:`KeepaliveConnection` is the thin websockets
adapter (plugged in with ``connect``'s ``create_connection`` hook) that feeds it
and aborts the TCP connection of a dead link, so the session loop reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from websockets.asyncio.client import ClientConnection

__all__ = ["DEAD_AFTER_PERIODS", "KeepaliveConnection", "Liveness"]

logger = logging.getLogger("localproxy.keepalive")

DEAD_AFTER_PERIODS = 3
MAX_UNANSWERED_PINGS = 8  # older ones are forgotten (a pong answers every earlier ping anyway)


class Liveness:
    """When is a websocket dead? Times are seconds on any monotonic clock."""

    def __init__(self, period: float, now: float) -> None:
        if period <= 0:
            raise ValueError("period must be positive")
        self.period = period
        self.limit = DEAD_AFTER_PERIODS * period
        self.armed = False  # the service answered a ping in this session
        self.last_received = now

    def received(self, now: float) -> None:
        """Bytes arrived (or the proxy was not reading: silence was its own)."""
        self.last_received = now

    def pong(self, now: float) -> None:
        self.armed = True
        self.last_received = now

    def deadline(self) -> float | None:
        """When the link will be declared dead if nothing arrives; None while unarmed."""
        return self.last_received + self.limit if self.armed else None

    def verdict(self, now: float) -> str | None:
        """Why the link is dead, or None while it may be alive."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        return (
            f"nothing received from the service for {now - self.last_received:.1f} s "
            f"({DEAD_AFTER_PERIODS} ping periods of {self.period:g} s): the link is dead"
        )


class KeepaliveConnection(ClientConnection):
    """A client connection that pings every ``ping_interval`` and aborts a dead link.

    websockets' own keepalive task (``ping_timeout=None``) is replaced by
    :meth:`keepalive`; websockets starts it after the handshake and cancels it
    when the connection is lost. ``dead_reason`` says why this side aborted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.liveness: Liveness | None = None
        self.dead_reason: str | None = None

    def data_received(self, data: bytes) -> None:
        liveness = self.liveness
        if liveness is not None:
            liveness.last_received = self.loop.time()
        super().data_received(data)

    def acknowledge_pings(self, data: bytes) -> None:
        liveness = self.liveness
        if liveness is not None and data in self.pong_waiters:
            if not liveness.armed:
                logger.debug(
                    "Websocket: the service answers pings; %g s of silence will now mean a dead link",
                    liveness.limit,
                )
            liveness.pong(self.loop.time())
        super().acknowledge_pings(data)

    async def keepalive(self) -> None:
        assert self.ping_interval is not None
        loop = self.loop
        liveness = self.liveness = Liveness(self.ping_interval, loop.time())
        _set_user_timeout(self, liveness.limit)
        next_ping = loop.time() + liveness.period
        while True:
            now = loop.time()
            if not self.transport.is_reading():
                liveness.received(now)  # paused by the proxy: silence proves nothing
            reason = liveness.verdict(now)
            if reason is not None:
                self.dead_reason = reason
                logger.warning("Websocket: %s; closing it and reconnecting", reason)
                self.transport.abort()  # no close handshake over a dead link
                return
            if now >= next_ping:
                next_ping = now + liveness.period
                self._forget_old_pings()
                try:
                    await self.ping()  # the pong waiter is not awaited: acknowledge_pings sees it
                except Exception:  # noqa: BLE001 - closing: the session loop sees why
                    return
            deadline = liveness.deadline()
            wake = next_ping if deadline is None else min(next_ping, deadline)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    def _forget_old_pings(self) -> None:
        """A service that never answers would grow websockets' ping table forever."""
        waiters = self.pong_waiters
        while len(waiters) >= MAX_UNANSWERED_PINGS:
            waiter, _ = waiters.pop(next(iter(waiters)))
            waiter.cancel()


def _set_user_timeout(connection: ClientConnection, seconds: float) -> None:
    """TCP_USER_TIMEOUT: the kernel aborts if sent data (our pings) stays unacknowledged.

    This also catches a dead first hop before the service ever answered a ping;
    a middlebox that terminates TCP (a proxy, a load balancer) acks for the
    service, so the pong rule above is still needed.
    """
    sock = connection.transport.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
    except OSError:  # pragma: no cover - closed under us, or not supported here
        pass
