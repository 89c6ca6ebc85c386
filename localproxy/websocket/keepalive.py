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
- Silence this side causes does not count: while the proxy does not read the
  websocket (a slow local reader pauses it) nothing can arrive; while the
  service does not take our bytes (backpressure from a slow peer: websockets'
  write buffer holds data) our ping waits behind them. A link that died under a
  stalled upload is told from backpressure by the kernel retransmitting
  (``TCP_INFO``, Linux); elsewhere it is left to TCP's own timeout.
- No ``TCP_USER_TIMEOUT``: Linux also applies it to a zero window, so it would
  kill a healthy tunnel whose peer stopped reading for that long.
- Backpressure has a bound, :data:`MAX_UNSENT`: the sender keeps its own bytes in
  websockets' write buffer near its budget (128 KiB at most, ``sender.py``), but
  websockets answers every ping with a pong written at once. A service that sends
  pings and reads nothing would grow the buffer without end (measured: 225 MB in
  10 s) while looking alive. Past the bound the link is treated as dead: aborted
  with a warning, and the session loop reconnects. Checked where pongs are
  written (after websockets handled received control frames) and at every
  keepalive wake, so it fires even if nothing more arrives; and a buffer over
  half the bound is no excuse for silence (our own data never fills it so far), so
  a service that made us write that much and went quiet is found dead as usual.

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

__all__ = ["DEAD_AFTER_PERIODS", "MAX_UNANSWERED_PINGS", "MAX_UNSENT", "KeepaliveConnection", "Liveness"]

logger = logging.getLogger("localproxy.keepalive")

DEAD_AFTER_PERIODS = 3
MAX_UNANSWERED_PINGS = 8  # older ones are forgotten (a pong answers every earlier ping anyway)
# Bytes in websockets' write buffer past which the service is not taking our bytes
# while making us write more (pongs): 4x the most the sender itself leaves there.
MAX_UNSENT = 1024 * 1024


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
        self.max_unsent = MAX_UNSENT
        self.unsent_peak = 0  # the largest write buffer seen by check_unsent (stats, tests)
        self.overflowed = False  # aborted for passing max_unsent

    def data_received(self, data: bytes) -> None:
        self.note_received()
        super().data_received(data)
        self.check_unsent()

    def check_unsent(self) -> bool:
        """Abort the link if the write buffer is past :data:`MAX_UNSENT`; True if it was."""
        transport = self.transport
        size = transport.get_write_buffer_size()
        if size > self.unsent_peak:
            self.unsent_peak = size
        if size <= self.max_unsent or self.dead_reason is not None:
            return self.dead_reason is not None
        self.overflowed = True
        self.dead_reason = (
            f"the service takes none of our bytes but keeps sending frames that need an answer "
            f"(pings): {size:,} bytes wait unsent (bound {self.max_unsent:,})"
        )
        logger.warning("Websocket: %s; closing it and reconnecting", self.dead_reason)
        transport.abort()  # a close handshake would wait behind the unsent bytes
        return True

    def note_received(self) -> None:
        liveness = self.liveness
        if liveness is not None:
            liveness.received(self.loop.time())

    def _pong_received(self, pong: asyncio.Future[float]) -> None:
        liveness = self.liveness
        if liveness is None or pong.cancelled() or pong.exception() is not None:
            return  # forgotten, or the connection closed
        if not liveness.armed:
            logger.debug(
                "Websocket: the service answers pings; %g s of silence will now mean a dead link",
                liveness.limit,
            )
        liveness.pong(self.loop.time())

    async def keepalive(self) -> None:
        assert self.ping_interval is not None
        loop = self.loop
        liveness = self.liveness = Liveness(self.ping_interval, loop.time())
        next_ping = loop.time() + liveness.period
        while True:
            now = loop.time()
            if self.check_unsent():
                return
            if self._silence_is_ours():
                liveness.received(now)
            reason = liveness.verdict(now)
            if reason is not None:
                self.dead_reason = reason
                logger.warning("Websocket: %s; closing it and reconnecting", reason)
                self.transport.abort()  # no close handshake over a dead link
                return
            if now >= next_ping:
                next_ping = now + liveness.period
                # Not while our bytes wait to be sent: ping() would block this loop until
                # they drain (the ping would wait behind them anyway, and they keep
                # middleboxes from seeing an idle link).
                if not self.transport.get_write_buffer_size():
                    self._forget_old_pings()
                    try:
                        pong = await self.ping()
                    except Exception:  # noqa: BLE001 - closing: the session loop sees why
                        return
                    pong.add_done_callback(self._pong_received)  # type: ignore[attr-defined]
            deadline = liveness.deadline()
            wake = next_ping if deadline is None else min(next_ping, deadline)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    def _silence_is_ours(self) -> bool:
        """Nothing can be expected from the service now, because of this side."""
        transport = self.transport
        if not transport.is_reading():
            return True  # the proxy paused reading: a slow local reader
        # The service does not take our bytes (a slow peer): our ping waits behind them.
        # Unless the buffer holds more than our own data ever makes it hold: then the
        # service made us write it (pongs), and its silence is its own.
        size = transport.get_write_buffer_size()
        return 0 < size <= self.max_unsent // 2 and not _retransmitting(transport)

    def _forget_old_pings(self) -> None:
        """A service that never answers would grow websockets' ping table forever."""
        # "pong_waiters" up to websockets 15, "pending_pings" since.
        waiters: dict[bytes, tuple[asyncio.Future[float], float]] = getattr(
            self, "pending_pings", None
        ) or getattr(self, "pong_waiters", {})
        while len(waiters) >= MAX_UNANSWERED_PINGS:
            waiter, _ = waiters.pop(next(iter(waiters)))
            waiter.cancel()


def _retransmitting(transport: asyncio.BaseTransport) -> bool:
    """The kernel is retransmitting unacknowledged data (Linux ``tcpi_retransmits``).

    Backpressure (a zero window) leaves it at 0: the peer acknowledges what it got
    and answers the window probes. False where ``TCP_INFO`` is not available.
    """
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 8)
    except OSError:
        return False
    return len(info) > 2 and info[2] > 0  # struct tcp_info: u8 state, ca_state, retransmits
