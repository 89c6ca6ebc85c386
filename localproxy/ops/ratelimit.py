"""Rate limits for log lines a peer can cause, and escaping of peer text (sans-I/O).

A hostile or broken peer can trigger the same log line thousands of times a second
(a frame for an unknown stream, a connection over the limit): without a limit the
log grows by megabytes a second. :class:`RateLimiter` lets the first ``burst``
lines of each *key* (a message template, not the formatted text: ids in the text
must not make every line new) through per ``window`` seconds and counts the rest;
when a window with suppressed lines ends, :meth:`RateLimiter.admit` or
:meth:`RateLimiter.due` hands back a :class:`Summary` ("... 14,203 more in the
last 10 s"). The clock is injected: no I/O, no timers here (the logging side
schedules the flush: :mod:`localproxy.ops.peerlog`).

:func:`escape` makes peer-controlled text safe for a one-line log format.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable

from localproxy.records import record

__all__ = ["BURST", "MAX_KEYS", "WINDOW", "RateLimiter", "Summary", "escape", "summary_text"]

BURST = 5  # lines per key per window logged as they come
WINDOW = 10.0  # seconds
MAX_KEYS = 512  # keys tracked at once (the oldest is dropped, its summary handed out)


@record(frozen=True, slots=True)
class Summary:
    """``count`` lines of ``key`` were suppressed over ``seconds``; ``last`` is the latest one's text."""

    key: Hashable
    count: int
    seconds: float
    last: str


class _Window:
    __slots__ = ("start", "seen", "suppressed", "last")

    def __init__(self, start: float) -> None:
        self.start = start
        self.seen = 0
        self.suppressed = 0
        self.last = ""


class RateLimiter:
    """Per-key token window: ``burst`` admitted per ``window`` seconds, the rest counted."""

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if burst < 1 or window <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be >= 1, window > 0")
        self.burst = burst
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[Hashable, _Window] = {}
        self._evicted: list[Summary] = []
        self.suppressed_total = 0  # lines suppressed since creation (for tests and stats)

    def admit(self, key: Hashable, text: str = "") -> tuple[bool, Summary | None]:
        """Log this line of ``key``? Also the summary of its previous window, if one ended."""
        now = self.clock()
        windows = self._windows
        window = windows.get(key)
        summary = None
        if window is None:
            if len(windows) >= self.max_keys:
                self._evict_oldest(now)
            window = windows[key] = _Window(now)
        elif now - window.start >= self.window:
            summary = self._close(key, window, now)
            window.start, window.seen, window.suppressed = now, 0, 0
        window.seen += 1
        if window.seen <= self.burst:
            return True, summary
        window.suppressed += 1
        window.last = text
        self.suppressed_total += 1
        return False, summary

    def next_due(self) -> float | None:
        """When the earliest window with suppressed lines ends (clock time), if any."""
        if self._evicted:
            return self.clock()
        ends = [w.start + self.window for w in self._windows.values() if w.suppressed]
        return min(ends) if ends else None

    def due(self, *, force: bool = False) -> list[Summary]:
        """Summaries of the windows that ended with suppressed lines (with ``force``: of
        every window, ended or not); keys of ended windows are forgotten."""
        now = self.clock()
        out, self._evicted = self._evicted, []
        for key, window in list(self._windows.items()):
            if now - window.start < self.window and not force:
                continue
            summary = self._close(key, window, now)
            if summary is not None:
                out.append(summary)
            del self._windows[key]  # a new line starts a new window
        return out

    def _close(self, key: Hashable, window: _Window, now: float) -> Summary | None:
        if not window.suppressed:
            return None
        return Summary(key, window.suppressed, min(now - window.start, self.window), window.last)

    def _evict_oldest(self, now: float) -> None:
        key = next(iter(self._windows))
        window = self._windows.pop(key)
        if window.suppressed:
            self._evicted.append(Summary(key, window.suppressed, now - window.start, window.last))


def summary_text(summary: Summary) -> str:
    """``<last suppressed line> ... 14,203 more in the last 10 s``."""
    seconds = summary.seconds
    span = f"{seconds:.0f}" if seconds >= 9.95 else f"{seconds:.1f}"
    return f"{summary.last} ... {summary.count:,} more in the last {span} s"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """``text`` without line breaks or control characters: they become ``\\n``, ``\\x1b``...

    Printable text (any script) is kept as is; so is a backslash, unless the text
    needs escaping (then it doubles, so the escaped form cannot be forged).
    """
    if text.isprintable():
        return text
    parts = []
    for char in text:
        if char.isprintable() and char != "\\":
            parts.append(char)
        elif char in _ESCAPES:
            parts.append(_ESCAPES[char])
        else:
            code = ord(char)
            parts.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(parts)
