"""localproxy.ops.ratelimit (sans-I/O: an injected clock, no sockets) and its logging side (PeerLog)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from localproxy.ops.logs import reset_logging, setup_logging
from localproxy.ops.peerlog import PeerLog
from localproxy.ops.ratelimit import RateLimiter, Summary, escape, summary_text
from localproxy.tunnel.services import ignored_services, name_list
from localproxy.types import SourcePort


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counted_then_summarised_by_the_next_line() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=3, window=10, clock=clock)
    admitted = [limiter.admit("k", f"line {i}") for i in range(14_206)]
    assert [ok for ok, _ in admitted[:4]] == [True, True, True, False]
    assert sum(ok for ok, _ in admitted) == 3
    assert all(summary is None for _, summary in admitted)
    assert limiter.suppressed_total == 14_203
    clock.now += 10
    ok, summary = limiter.admit("k", "next")
    assert ok and summary == Summary("k", 14_203, 10.0, "line 14205")
    assert summary_text(summary) == "line 14205 ... 14,203 more in the last 10 s"


def test_keys_are_independent_and_due_reports_ended_windows() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=1, window=10, clock=clock)
    assert limiter.admit("a")[0] and limiter.admit("b")[0]
    assert not limiter.admit("a", "a2")[0]
    assert limiter.next_due() == 110.0
    assert limiter.due() == []  # the window has not ended
    clock.now = 112
    assert limiter.due() == [Summary("a", 1, 10.0, "a2")]
    assert limiter.due() == [] and limiter.next_due() is None
    assert limiter.admit("a")[0]  # a new window


def test_force_reports_open_windows_and_keys_are_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(burst=1, window=10, clock=clock, max_keys=2)
    for key in ("a", "a", "b", "b"):
        limiter.admit(key, key)
    limiter.admit("c", "c")  # evicts "a", whose count is kept for the next due()
    clock.now += 1
    assert [s.key for s in limiter.due()] == ["a"]
    assert [(s.key, s.count) for s in limiter.due(force=True)] == [("b", 1)]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RateLimiter(burst=0)
    with pytest.raises(ValueError):
        RateLimiter(window=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text, ünïcode, 中文", "plain text, ünïcode, 中文"),
        ("a\\b", "a\\b"),  # printable: kept
        ("line\nforged", "line\\nforged"),
        ("\x1b[2J\r\t\x00\x7f", "\\x1b[2J\\r\\t\\x00\\x7f"),
        ("back\\slash\n", "back\\\\slash\\n"),  # doubled when escaping: "\\n" cannot be forged
        ("\u2028\U000e0001", "\\u2028\\U000e0001"),
    ],
)
def test_escape(text: str, expected: str) -> None:
    assert escape(text) == expected
    assert escape(text).isprintable()


def test_name_list_is_capped_and_quotes_odd_ids() -> None:
    ids = [f"S{i}" for i in range(2000)]
    assert name_list(ids) == "S0, S1, S2, S3, S4 and 1,995 more"
    assert name_list(["A", "B"]) == "A, B"
    assert name_list([]) == "none"
    assert name_list(["a\nb", " x"]) == "'a\\nb', ' x'"
    assert ignored_services({"A": SourcePort(0)}, ["A", "B", "B", "C"]) == ["B", "C"]
    assert ignored_services({"A": SourcePort(0)}, None) == []


@pytest.mark.parametrize("log_format", ["reference", "json"])
async def test_peer_log_limits_lines_in_both_formats_and_flushes_by_timer(log_format: str) -> None:
    stream = io.StringIO()
    setup_logging(4, stream, log_format=log_format)
    try:
        peer_log = PeerLog(RateLimiter(burst=2, window=0.2, clock=asyncio.get_running_loop().time))
        logger = logging.getLogger("localproxy.test")
        for stream_id in range(1000):
            peer_log.log(logger, logging.INFO, "dead", "stream %d is dead", stream_id)
        peer_log.log(logger, logging.DEBUG, "hidden", "not shown at -v 4")  # not counted
        assert peer_log.suppressed == 998
        # No further line comes: the timer reports the count once the window ends.
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while "more in the last" not in stream.getvalue() and loop.time() < end:
            await asyncio.sleep(0.05)  # (polling a StringIO: nothing to wait on)
    finally:
        reset_logging()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    if log_format == "json":
        last = json.loads(lines[-1])
        assert last["suppressed"] == 998
        assert last["message"] == "stream 999 is dead ... 998 more in the last 0.2 s"
    else:
        assert lines[-1].endswith("stream 999 is dead ... 998 more in the last 0.2 s")
        assert "[info]" in lines[-1]


def test_reference_format_escapes_peer_text_but_keeps_our_advice_lines() -> None:
    from localproxy.ops.logs import ReferenceFormatter

    formatter = ReferenceFormatter()

    def line(message: str, **extra: object) -> str:
        record = logging.LogRecord("localproxy.test", logging.ERROR, __file__, 1, "%s", (message,), None)
        record.__dict__.update(extra)
        return formatter.format(record)

    forged = line("closed: bye\n[2026-01-01T00:00:00.000000]{1}[error]   FORGED\x1b[2J")
    assert "\n" not in forged and "\x1b" not in forged
    assert forged.endswith("closed: bye\\n[2026-01-01T00:00:00.000000]{1}[error]   FORGED\\x1b[2J")
    advice = line("Refused.\nWhy: single-use.\x1b[31m\nFix: rotate", multiline=True)
    assert advice.split("\n")[1:] == ["Why: single-use.\\x1b[31m", "Fix: rotate"]
