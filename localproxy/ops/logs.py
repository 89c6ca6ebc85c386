"""Logging in the reference proxy's format, with secrets masked.

Format (as the C++ ``localproxy`` prints it)::

    [2019-01-17T21:37:15.528290]{632}[info]    message

``-v`` levels: 0 off, 1 fatal, 2 error, 3 warning, 4 info, 5 debug, 6+ trace.

``--log-format json`` (:class:`JsonFormatter`) prints one JSON object per line
instead: ``ts`` (UTC), ``level``, ``pid``, ``logger``, ``message`` and the
structured fields a record carries (``tunnel``, ``service``, ``connection``...:
``extra=`` of the logging call, or the tunnel of the proxy task that logs).

Secrets (access tokens, client tokens, proxy passwords) are registered once with
:func:`register_secret`; :class:`RedactingFilter` replaces them by ``<redacted>``
in every record passing through a handler it is attached to. ``setup_logging``
installs it; library users can attach it to their own handlers.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
import threading
import time
from typing import TextIO

from localproxy.ops.ratelimit import escape

TRACE = 5
logging.addLevelName(TRACE, "trace")

REDACTED = "<redacted>"

# Reference level names, lower case as boost::log prints them.
_LEVEL_NAMES = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}

# -v value -> lowest level shown; 0 is "off".
_VERBOSITY_LEVELS = {
    1: logging.CRITICAL,
    2: logging.ERROR,
    3: logging.WARNING,
    4: logging.INFO,
    5: logging.DEBUG,
    6: TRACE,
}
_OFF = logging.CRITICAL + 10

# The tunnel a log record is about: set by each LocalProxy in its own task.
log_tunnel: contextvars.ContextVar[str | None] = contextvars.ContextVar("localproxy_log_tunnel", default=None)
# Record attributes (logging's extra=) that JSON lines carry as fields.
STRUCTURED_FIELDS = ("tunnel", "service", "stream", "connection", "generation", "peer", "suppressed")
LOG_FORMATS = ("reference", "json")

# Longest first, so that a secret containing another is masked whole. Plain
# search, not one regex of them all: a process with hundreds of proxies
# registers hundreds of tokens, and each new alternation regex cost a compile
# and ~100 KiB left in re's cache (benchmarks/bench_footprint.py).
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` in every log record and in :func:`redact` from now on."""
    global _secrets
    if not value:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def forget_secret(value: str | None) -> None:
    """Stop masking ``value`` (a revoked or replaced token: the list must not grow forever)."""
    global _secrets
    if not value:
        return
    with _secrets_lock:
        if value in _secrets:
            _secrets = tuple(secret for secret in _secrets if secret != value)


def registered_secret_count() -> int:
    """How many secrets are masked now (tests and footprint checks)."""
    return len(_secrets)


def forget_secrets() -> None:
    """Forget every registered secret (tests; a process that is done with its tokens)."""
    global _secrets
    with _secrets_lock:
        _secrets = ()


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``<redacted>``."""
    secrets = _secrets
    if not text or not secrets:
        return text
    # Spans of every occurrence in the original text, so that a short secret
    # never matches inside an earlier "<redacted>"; overlapping spans are merged.
    spans: list[tuple[int, int]] = []
    for secret in secrets:
        start = text.find(secret)
        while start != -1:
            spans.append((start, start + len(secret)))
            start = text.find(secret, start + 1)
    if not spans:
        return text
    spans.sort()
    parts: list[str] = []
    done = 0
    end = -1
    for start, stop in spans:
        if start >= end:  # a new masked run
            if end > done:
                done = end
            parts.append(text[done:start])
            parts.append(REDACTED)
            end = stop
        else:
            end = max(end, stop)
    parts.append(text[max(end, done):])
    return "".join(parts)


def level_for_verbosity(verbosity: int) -> int:
    """The lowest logging level shown at ``-v verbosity`` (0 gives a level above all)."""
    if verbosity <= 0:
        return _OFF
    return _VERBOSITY_LEVELS[min(verbosity, 6)]


class RedactingFilter(logging.Filter):
    """Replaces registered secrets in the message, its args and exception text.

    The record is rewritten in place (message merged with its args) so every
    later handler and formatter only ever sees the masked text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the record, mask what we can
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class ReferenceFormatter(logging.Formatter):
    """``[local ISO time with microseconds]{pid}[level]<pad> message``.

    The message is escaped (:func:`~localproxy.ops.ratelimit.escape`): text a peer
    sent (a service id, a close reason, a header) must not start a line of its own
    or carry terminal escapes. Tracebacks after it keep their lines, and so does a
    record logged with ``extra={"multiline": True}`` (our own advice on several
    lines: every other control character is still escaped, and the peer text
    such messages quote is cleaned where they are built).
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = local_stamp(record.created)
        level = "[" + _level_name(record.levelno) + "]"
        # The reference prints the bracketed level in a field of 9, then a space.
        message = record.getMessage()
        if getattr(record, "multiline", False):  # our own text on several lines (advice)
            message = "\n".join(escape(part) for part in message.split("\n"))
        else:
            message = escape(message)
        line = f"[{stamp}]{{{os.getpid()}}}{level:<9} {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        # Belt and braces: the filter already masked the record.
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, pid, logger, message, structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        # Imported here: only --log-format json uses them (start-up memory, issue 21).
        import datetime
        import json

        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, object] = {
            "ts": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": _level_name(record.levelno),
            "pid": os.getpid(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        attributes = record.__dict__
        for name in STRUCTURED_FIELDS:
            value = attributes.get(name)
            if value is None and name == "tunnel":
                value = log_tunnel.get()
            if value is not None:
                line[name] = value if isinstance(value, (int, float, bool)) else redact(str(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        # Secrets were masked field by field, before JSON escaping could disguise them.
        return json.dumps(line, ensure_ascii=False)


def local_stamp(created: float) -> str:
    """``created`` as local ISO time with microseconds, as ``datetime.fromtimestamp(created)``
    formats it (microseconds rounded half to even), without importing datetime (~0.4 MiB)."""
    fraction, whole = math.modf(created)
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(whole)) + f".{micros:06d}"


def _level_name(levelno: int) -> str:
    if levelno in _LEVEL_NAMES:
        return _LEVEL_NAMES[levelno]
    # Custom levels: the closest standard level at or below.
    below = [level for level in _LEVEL_NAMES if level <= levelno]
    return _LEVEL_NAMES[max(below)] if below else "trace"


# (logger, our handler, its level and propagate before setup_logging)
_installed: list[tuple[logging.Logger, logging.Handler, int, bool]] = []

# Third-party loggers routed through our handler: their debug output can carry
# request headers (the access token), so it must pass the redacting filter.
_THIRD_PARTY_LOGGERS = ("websockets", "asyncio")


def setup_logging(verbosity: int, stream: TextIO | None = None, *, log_format: str = "reference") -> logging.Handler:
    """Send ``localproxy.*`` logs to ``stream`` (stdout, as the reference) at the ``-v`` level.

    ``log_format`` is ``"reference"`` (the C++ proxy's lines) or ``"json"``.

    Calling it again replaces the previous setup (handy in tests). Returns the
    handler, which carries the :class:`RedactingFilter`.
    """
    reset_logging()
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ReferenceFormatter())
    handler.addFilter(RedactingFilter())
    level = level_for_verbosity(verbosity)
    handler.setLevel(level)

    _attach(logging.getLogger("localproxy"), handler, level)
    # Library chatter only at trace level; warnings and errors always (if shown).
    third_party_level = max(level, logging.DEBUG if verbosity >= 6 else logging.WARNING)
    for name in _THIRD_PARTY_LOGGERS:
        _attach(logging.getLogger(name), handler, third_party_level)
    return handler


def reset_logging() -> None:
    """Undo :func:`setup_logging`: remove its handler, restore levels and propagation."""
    for logger, handler, level, propagate in reversed(_installed):
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    _installed.clear()


def _attach(logger: logging.Logger, handler: logging.Handler, level: int) -> None:
    _installed.append((logger, handler, logger.level, logger.propagate))
    logger.setLevel(level)
    logger.addHandler(handler)
    logger.propagate = False  # our handler is the output; no duplicates via root
