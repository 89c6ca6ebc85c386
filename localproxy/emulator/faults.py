"""Fault injection state: failing handshakes and a bandwidth cap (token bucket).

The hooks that act on live websockets (drop, resets, raw bytes) live on ``Relay``;
this module keeps what is plain state so it can be tested without sockets.
"""

from __future__ import annotations

import asyncio
import time

# "Simultaneous TCP connections have a bandwidth limit of 800 Kilobytes per second"
# (AWS IoT developer guide, multiplexing): what --bandwidth reproduces.
SERVICE_BANDWIDTH = 800_000
# Kernel receive buffer of a capped peer's socket, in seconds of the cap: bytes the
# kernel holds before the relay's pacing would otherwise be a deep hidden queue.
CAPPED_RCVBUF_SECONDS = 0.01
CAPPED_RCVBUF_MIN = 8 * 1024
CAPPED_SEGMENT_SIZE = 1400  # TCP MSS of an emulator capped from its start (a real link's)


def capped_rcvbuf(bytes_per_second: float) -> int:
    return max(CAPPED_RCVBUF_MIN, int(bytes_per_second * CAPPED_RCVBUF_SECONDS))


class Faults:
    def __init__(self) -> None:
        self._fail_remaining = 0
        self._fail_status = 503
        self.bytes_per_second: float | None = None

    def fail_next_handshakes(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` upgrade requests with ``status`` (a 5xx)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        if not 500 <= status <= 599:
            raise ValueError(f"status must be a 5xx, got {status}")
        self._fail_remaining = count
        self._fail_status = status

    def take_handshake_failure(self) -> int | None:
        """The status to fail this handshake with, or None to let it through."""
        if self._fail_remaining <= 0:
            return None
        self._fail_remaining -= 1
        return self._fail_status

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive (or None for no cap)")
        self.bytes_per_second = bytes_per_second


class TokenBucket:
    """Paces one direction of a relay at ``Faults.bytes_per_second`` (read at each use).

    The bucket holds at most 50 ms worth of bytes; a chunk larger than what is in it
    drives the level negative and the caller sleeps until it is paid back, so the
    long-run rate is exact whatever the chunk sizes.
    """

    BURST_SECONDS = 0.05

    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        self._level = 0.0
        self._stamp = time.monotonic()

    async def take(self, size: int) -> None:
        rate = self._faults.bytes_per_second
        now = time.monotonic()
        if rate is None:
            self._level, self._stamp = 0.0, now
            return
        burst = rate * self.BURST_SECONDS
        self._level = min(burst, self._level + (now - self._stamp) * rate) - size
        self._stamp = now
        if self._level < 0:
            await asyncio.sleep(-self._level / rate)
