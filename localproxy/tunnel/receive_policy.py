"""When to read the websocket while local applications are slow to take their bytes (sans-I/O).

The protocol has no per-connection window: the only way to slow the peer down is
to stop reading the websocket, which stops *every* connection of the tunnel.
So stopping is a last resort, bounded in memory and in time:

- A local connection whose write buffer is over ``adapters.WRITE_HIGH`` (1 MiB)
  is *backlogged*; the websocket is still read, and its bytes keep queueing,
  until all backlogged connections together hold more than ``budget`` bytes
  (``tunneling.proxy.tcp.receive_budget_bytes``, 4 MiB). Then the websocket is
  not read until they are back under ``RESUME_FRACTION`` of it. Memory stays at
  about budget + one message + each connection's 1 MiB mark.
- If reading stays stopped for ``stall_timeout`` seconds
  (``tunneling.proxy.tcp.stalled_reader_timeout_ms``, 10 s; 0 = never), the
  connection holding the most is reset (CONNECTION_RESET, or STREAM_RESET for a
  V1/V2 stream) with a warning, so one stuck application cannot freeze the
  others indefinitely; then the next one if reading still cannot resume.

:class:`ReceiveGate` decides; the engine measures the backlogs and carries out
the decision.
"""

from __future__ import annotations

from localproxy.records import record

__all__ = ["RESUME_FRACTION", "ReceiveDecision", "ReceiveGate"]

RESUME_FRACTION = 0.75


@record(frozen=True, slots=True)
class ReceiveDecision:
    read: bool  # read the websocket
    reset: int | None = None  # reset this local connection (the one holding the most)
    stalled_for: float = 0.0  # seconds reading has been stopped, when reset is set


class ReceiveGate:
    """Read or not, from the backlogged connections' buffered bytes."""

    def __init__(self, budget: int, stall_timeout: float) -> None:
        self.budget = budget
        self.stall_timeout = stall_timeout
        self.reading = True
        self._stopped_at = 0.0

    def update(self, backlogs: dict[int, int], now: float) -> ReceiveDecision:
        """``backlogs``: connection key -> bytes buffered, for the backlogged connections."""
        total = sum(backlogs.values())
        if self.reading:
            if total > self.budget:
                self.reading = False
                self._stopped_at = now
        elif total <= self.budget * RESUME_FRACTION:
            self.reading = True
        if self.reading or not backlogs or self.stall_timeout <= 0:
            return ReceiveDecision(self.reading)
        stalled = now - self._stopped_at
        if stalled < self.stall_timeout:
            return ReceiveDecision(False)
        self._stopped_at = now  # the next culprit, if any, gets a full timeout of its own
        culprit = max(backlogs, key=lambda key: backlogs[key])
        return ReceiveDecision(False, culprit, stalled)
