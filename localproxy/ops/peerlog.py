"""Log lines a peer can cause, rate-limited (:class:`~localproxy.ops.ratelimit.RateLimiter`).

:func:`log_limited` is the call for every line a remote peer (the service, the
other proxy through it) or a flood of local clients can trigger again and again:
the first :data:`~localproxy.ops.ratelimit.BURST` of a kind per 10 s are logged,
the rest counted and summarised once the window ends (``<line> ... 14,203 more in
the last 10 s``), by a timer on the running loop if no further line comes. Kinds
are per tunnel (the :data:`~localproxy.ops.logs.log_tunnel` of the task), logger,
level and template. Works for both log formats: it only decides which records
are made.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Hashable

from localproxy.ops.logs import log_tunnel
from localproxy.ops.ratelimit import RateLimiter, Summary, summary_text

__all__ = ["limiter", "log_limited"]

limiter = RateLimiter()
_timer: asyncio.TimerHandle | None = None
_timer_loop: asyncio.AbstractEventLoop | None = None


def log_limited(logger: logging.Logger, level: int, key: str, message: str, *args: Any) -> None:
    """``logger.log(level, message, *args)`` unless lines of ``key`` are over the rate limit."""
    if not logger.isEnabledFor(level):
        return
    text = message % args if args else message
    admitted, summary = limiter.admit((log_tunnel.get(), logger.name, level, key), text)
    if summary is not None:
        _log_summary(summary)
    if admitted:
        logger.log(level, "%s", text)
    else:
        _schedule_flush()


def _log_summary(summary: Summary) -> None:
    key: Any = summary.key
    tunnel, name, level = key[0], key[1], key[2]
    token = log_tunnel.set(tunnel)
    try:
        logging.getLogger(name).log(level, "%s", summary_text(summary), extra={"suppressed": summary.count})
    finally:
        log_tunnel.reset(token)


def _schedule_flush() -> None:
    global _timer, _timer_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a thread): the next line of that kind reports it
        return
    if _timer is not None and _timer_loop is loop and not loop.is_closed():
        return  # (a timer of a loop that ended is replaced)
    due = limiter.next_due()
    if due is None:
        return
    _timer_loop = loop
    _timer = loop.call_later(max(0.0, due - limiter.clock()) + 0.01, _flush)


def _flush() -> None:
    global _timer
    _timer = None
    for summary in limiter.due():
        _log_summary(summary)
    _schedule_flush()


def flush_now() -> list[Hashable]:
    """Log every summary due now (tests, shutdown); returns their keys."""
    summaries = limiter.due()
    for summary in summaries:
        _log_summary(summary)
    return [summary.key for summary in summaries]
