"""How many bytes may sit below the scheduler: sized from the websocket's drain rate (sans-I/O).

Whatever has left the :class:`~localproxy.tunnel.scheduler.SendScheduler` (the message
being sent, websockets' write buffer, the kernel's unsent bytes) can no longer
be reordered: a keystroke waits for all of it. At loopback speed 128 KiB drains
in a fraction of a millisecond; through the service's ~800 kB/s cap it takes
160 ms. So the budget for that layer is a *time*: :class:`Pacer` measures the
rate at which sends complete while the sender is backlogged and allows about
``target_delay`` worth of bytes (between ``minimum`` and ``maximum``) per
message, in the write buffer and in the kernel (``TCP_NOTSENT_LOWAT``).

It starts at 32 KiB, so a bulk transfer that begins on a slow link does not
first bury it under a large burst. A sender that keeps up with its connections
is never busy for a whole window and measures no rate; so when it runs dry
after sending at least a budget's worth faster than the budget's own rate, the
budget doubles (up to the largest): on a fast link messages reach 128 KiB after
two such bursts, where small ones would only cost CPU.
"""

from __future__ import annotations

from localproxy.wire.codec import MAX_WS_MESSAGE

__all__ = ["Pacer"]

TARGET_DELAY = 0.004  # seconds of link time the layer below the scheduler may hold
MINIMUM = 4 * 1024
START = 32 * 1024
WINDOW = 0.02  # seconds of continuous sending per rate sample
SMOOTHING = 0.5  # weight of a new sample in the rate estimate


class Pacer:
    """Message and buffer budget from the measured drain rate."""

    def __init__(
        self,
        *,
        target_delay: float = TARGET_DELAY,
        minimum: int = MINIMUM,
        maximum: int = MAX_WS_MESSAGE,
        start: int = START,
    ) -> None:
        self.target_delay = target_delay
        self.minimum = minimum
        self.maximum = maximum
        self.rate: float | None = None  # bytes per second while backlogged
        self.budget = max(minimum, min(start, maximum))
        self._window_start: float | None = None
        self._window_bytes = 0
        self._last_sent = 0.0

    @property
    def slow(self) -> bool:
        """The budget is under the largest: keep the kernel's unsent bytes near it too."""
        return self.budget < self.maximum

    def idle(self) -> bool:
        """The sender ran out of data. True when :attr:`budget` changed (it grew: the
        burst just sent was at least a budget and drained faster than the budget's rate)."""
        start, sent = self._window_start, self._window_bytes
        self._window_start = None
        self._window_bytes = 0
        if start is None or sent < self.budget or self.budget >= self.maximum:
            return False
        busy = self._last_sent - start
        if busy > 0 and sent / busy < self.budget / self.target_delay:
            return False
        self.budget = min(self.maximum, self.budget * 2)
        return True

    def sending(self, now: float) -> None:
        """A send is about to start (right after the previous one, unless :meth:`idle`)."""
        if self._window_start is None:
            self._window_start = now
            self._window_bytes = 0

    def sent(self, size: int, now: float) -> bool:
        """A send of ``size`` bytes returned; True when :attr:`budget` changed."""
        start = self._window_start
        if start is None:
            return False
        self._window_bytes += size
        self._last_sent = now
        elapsed = now - start
        if elapsed < WINDOW:
            return False
        sample = self._window_bytes / elapsed
        self.rate = sample if self.rate is None else self.rate + SMOOTHING * (sample - self.rate)
        self._window_start = now
        self._window_bytes = 0
        budget = max(self.minimum, min(self.maximum, int(self.rate * self.target_delay)))
        if abs(budget - self.budget) * 4 < self.budget:
            return False  # within 25%: not worth retuning the buffers
        self.budget = budget
        return True
