"""Log lines a peer can cause, rate-limited (:class:`~localproxy.ops.ratelimit.RateLimiter`).

:meth:`PeerLog.log` is the call for every line a remote peer (the service, the
other proxy through it) or a flood of local clients can trigger again and again:
the first :data:`~localproxy.ops.ratelimit.BURST` of a kind per 10 s are logged,
the rest counted and summarised once the window ends (``<line> ... 14,203 more in
the last 10 s``), by a timer on the running loop if no further line of that kind
comes. A kind is a logger, a level and a template. One :class:`PeerLog` per proxy
(the engine's): proxies sharing a process do not share a budget. It only decides
which records are made, so both log formats and every verbosity are covered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from localproxy.ops.ratelimit import RateLimiter, Summary, summary_text

__all__ = ["PeerLog"]


class PeerLog:
    """Rate-limited logging of one proxy."""

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    @property
    def suppressed(self) -> int:
        """Lines suppressed so far (summarised, or to be)."""
        return self.limiter.suppressed_total

    def log(self, logger: logging.Logger, level: int, key: str, message: str, *args: Any) -> None:
        """``logger.log(level, message, *args)`` unless lines of ``key`` are over the rate limit."""
        if not logger.isEnabledFor(level):
            return
        text = message % args if args else message
        admitted, summary = self.limiter.admit((logger.name, level, key), text)
        if summary is not None:
            _log_summary(summary)
        if admitted:
            logger.log(level, "%s", text, stacklevel=2)  # the caller's file and line
        else:
            self._schedule_flush()

    def flush(self) -> int:
        """Log the summaries due now; returns how many."""
        self._timer = None
        summaries = self.limiter.due()
        for summary in summaries:
            _log_summary(summary)
        self._schedule_flush()
        return len(summaries)

    def close(self) -> None:
        """Stop the timer and log every pending summary (the proxy stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        limiter = self.limiter
        for summary in limiter.due(force=True):
            _log_summary(summary)

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a thread): the next line of that kind reports it
            return
        if self._timer is not None and self._timer_loop is loop:
            return
        due = self.limiter.next_due()
        if due is None:
            return
        self._timer_loop = loop
        # (call_later keeps this context: the summary carries the tunnel of the lines)
        self._timer = loop.call_later(max(0.0, due - self.limiter.clock()) + 0.01, self.flush)


def _log_summary(summary: Summary) -> None:
    key: Any = summary.key
    name: str = key[0]
    level: int = key[1]
    logging.getLogger(name).log(level, "%s", summary_text(summary), extra={"suppressed": summary.count})
