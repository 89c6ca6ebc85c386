"""How many bytes may sit below the scheduler: sized from the websocket's drain rate (sans-I/O).

Whatever has left the :class:`~localproxy.scheduler.SendScheduler` (the message
being sent, websockets' write buffer, the kernel's unsent bytes) can no longer
be reordered: a keystroke waits for all of it. At loopback speed 128 KiB drains
in a fraction of a millisecond; through the service's ~800 kB/s cap it takes
160 ms. So the budget for that layer is a *time*: :class:`Pacer` measures the
rate at which sends complete while the sender is backlogged and allows about
``target_delay`` worth of bytes (between ``minimum`` and ``maximum``) per
message, in the write buffer and in the kernel (``TCP_NOTSENT_LOWAT``).

Until a slow rate is measured the budget is the largest (a sender that keeps
up with its connections never measures anything, and small messages would only
cost CPU); each time the sender runs dry the budget doubles back towards it, as
a link that drains everything is not the bottleneck. A bulk transfer over a
slow link keeps the sender busy, so the first window (20 ms) shrinks it.
"""

from __future__ import annotations

from .codec import MAX_WS_MESSAGE

__all__ = ["Pacer"]

TARGET_DELAY = 0.004  # seconds of link time the layer below the scheduler may hold
MINIMUM = 4 * 1024
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
    ) -> None:
        self.target_delay = target_delay
        self.minimum = minimum
        self.maximum = maximum
        self.rate: float | None = None  # bytes per second while backlogged
        self.budget = maximum
        self._window_start: float | None = None
        self._window_bytes = 0

    @property
    def slow(self) -> bool:
        """A rate was measured and it keeps the budget under the largest."""
        return self.rate is not None and self.budget < self.maximum

    def idle(self) -> bool:
        """The sender ran out of data: the link kept up. True when :attr:`budget` changed."""
        self._window_start = None
        self._window_bytes = 0
        if self.budget >= self.maximum:
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
