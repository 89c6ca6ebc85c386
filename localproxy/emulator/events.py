"""What happened in the emulator, for tests and rigs to await instead of sleeping.

Kinds: ``tunnel_opened``, ``tunnel_closed``, ``tokens_rotated``, ``notify`` (the
MQTT notify payload the service would publish to a thing: it holds a destination
token, so events are kept in memory only and never logged), ``handshake_rejected``,
``connected``, ``disconnected``, ``replaced``, ``violation`` (a peer broke the wire
rules and was closed), ``dropped`` (data for an absent peer was discarded).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class EmulatorEvent:
    seq: int
    kind: str
    tunnel_id: str | None = None
    side: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


class EventLog:
    """A bounded history of events plus waiters woken at each new event."""

    def __init__(self, limit: int = 10000) -> None:
        self.history: deque[EmulatorEvent] = deque(maxlen=limit)
        self._seq = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def mark(self) -> int:
        """The sequence number of the latest event; pass it as ``since`` to see later ones only."""
        return self._seq

    def emit(self, kind: str, tunnel_id: str | None = None, side: str | None = None, **detail: Any) -> EmulatorEvent:
        self._seq += 1
        event = EmulatorEvent(self._seq, kind, tunnel_id, side, detail)
        self.history.append(event)
        self.changed()
        return event

    def changed(self) -> None:
        """Wake every waiter so it re-checks its condition."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def find(
        self, kind: str, *, since: int = 0, tunnel_id: str | None = None, side: str | None = None, **detail: Any
    ) -> EmulatorEvent | None:
        for event in self.history:
            if (
                event.seq > since
                and event.kind == kind
                and (tunnel_id is None or event.tunnel_id == tunnel_id)
                and (side is None or event.side == side)
                and all(event.detail.get(key) == value for key, value in detail.items())
            ):
                return event
        return None

    async def wait_until(self, condition: Callable[[], Any], timeout: float) -> Any:
        """Return ``condition()``'s first truthy value; TimeoutError after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not (result := condition()):
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._waiters.discard(waiter)
            return result

    async def wait(
        self,
        kind: str,
        *,
        since: int = 0,
        timeout: float = 10,
        tunnel_id: str | None = None,
        side: str | None = None,
        **detail: Any,
    ) -> EmulatorEvent:
        """The first event of ``kind`` after ``since`` matching the given fields (history included)."""
        result: EmulatorEvent = await self.wait_until(
            lambda: self.find(kind, since=since, tunnel_id=tunnel_id, side=side, **detail), timeout
        )
        return result
