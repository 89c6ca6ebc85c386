"""localproxy.ops.logs: reference log format, -v levels, secret redaction."""

from __future__ import annotations

import io
import logging
import os
import re
import secrets

import pytest

from localproxy.ops.logs import (
    REDACTED,
    TRACE,
    RedactingFilter,
    ReferenceFormatter,
    level_for_verbosity,
    redact,
    register_secret,
    reset_logging,
    setup_logging,
)

LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\]\{(\d+)\}(\[[a-z]+\] *) (.*)$"
)


@pytest.fixture
def stream() -> io.StringIO:
    output = io.StringIO()
    yield output
    reset_logging()  # leave the loggers as other tests expect them


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_format_matches_reference_with_padding(stream: io.StringIO) -> None:
    setup_logging(6, stream=stream)
    logger = logging.getLogger("localproxy.test")
    logger.log(TRACE, "t")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    logger.critical("f")
    lines = _lines(stream)
    assert len(lines) == 6
    prefixes = []
    for line in lines:
        match = LINE.match(line)
        assert match, line
        assert int(match.group(2)) == os.getpid()
        prefixes.append(match.group(3))
    # What the reference prints: "[level]" in a 9-wide field, then one space.
    assert prefixes == ["[trace]  ", "[debug]  ", "[info]   ", "[warning]", "[error]  ", "[fatal]  "]
    assert lines[2].endswith("}[info]    i")
    assert lines[3].endswith("}[warning] w")


def test_timestamp_is_local_time_with_microseconds() -> None:
    record = logging.LogRecord("localproxy.x", logging.INFO, __file__, 1, "hello", None, None)
    record.created = 1547761035.528290
    line = ReferenceFormatter().format(record)
    import datetime

    expected = datetime.datetime.fromtimestamp(record.created).strftime("%Y-%m-%dT%H:%M:%S.%f")
    assert line.startswith(f"[{expected}]{{{os.getpid()}}}[info]    hello")


@pytest.mark.parametrize(
    ("verbosity", "shown"),
    [
        (0, []),
        (1, ["fatal"]),
        (2, ["error", "fatal"]),
        (3, ["warning", "error", "fatal"]),
        (4, ["info", "warning", "error", "fatal"]),
        (5, ["debug", "info", "warning", "error", "fatal"]),
        (6, ["trace", "debug", "info", "warning", "error", "fatal"]),
        (255, ["trace", "debug", "info", "warning", "error", "fatal"]),
    ],
)
def test_verbosity_levels(stream: io.StringIO, verbosity: int, shown: list[str]) -> None:
    setup_logging(verbosity, stream=stream)
    logger = logging.getLogger("localproxy.levels")
    for level in (TRACE, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        logger.log(level, "message")
    levels = [LINE.match(line).group(3).strip()[1:-1] for line in _lines(stream)]
    assert levels == shown


def test_level_for_verbosity_and_trace_name() -> None:
    assert level_for_verbosity(4) == logging.INFO
    assert level_for_verbosity(1) == logging.CRITICAL
    assert level_for_verbosity(0) > logging.CRITICAL
    assert logging.getLevelName(TRACE) == "trace"


def test_setup_twice_does_not_duplicate(stream: io.StringIO) -> None:
    setup_logging(4, stream=io.StringIO())
    setup_logging(4, stream=stream)
    logging.getLogger("localproxy.dup").info("once")
    assert len(_lines(stream)) == 1


def test_redact_replaces_registered_secrets_longest_first() -> None:
    short = "sec-" + secrets.token_hex(8)
    longer = short + "-and-more"
    register_secret(short)
    register_secret(longer)
    register_secret("")  # ignored
    register_secret(None)
    assert redact(f"a {longer} b {short} c") == f"a {REDACTED} b {REDACTED} c"
    assert redact("nothing secret") == "nothing secret"


def test_redact_overlapping_and_short_secrets_never_touch_the_mask() -> None:
    token = "tok-" + secrets.token_hex(8)
    register_secret(token)
    register_secret("e")  # a short proxy password: it must not rewrite "<redacted>"
    assert redact(f"{token}{token} e.") == f"{REDACTED}{REDACTED} {REDACTED}."
    overlapping = token[-6:] + "zz"  # overlaps the token's end: one masked run
    register_secret(overlapping)
    assert redact(f"x{token}zz y") == f"x{REDACTED} y"


def test_hundreds_of_secrets_all_masked() -> None:
    tokens = [f"tok-{i:03d}-" + secrets.token_hex(8) for i in range(300)]
    for token in tokens:
        register_secret(token)
    text = " ".join(tokens[::-1])
    assert redact(text) == " ".join([REDACTED] * len(tokens))


def test_filter_masks_message_args_and_exceptions(stream: io.StringIO) -> None:
    token = "tok-" + secrets.token_hex(16)
    register_secret(token)
    setup_logging(6, stream=stream)
    logger = logging.getLogger("localproxy.secret")
    logger.info("header access-token: %s", token)
    logger.info(f"inline {token}")
    logger.info("dict %(t)s", {"t": token})
    try:
        raise ValueError(f"boom {token}")
    except ValueError:
        logger.exception("failed")
    output = stream.getvalue()
    assert token not in output
    assert output.count(REDACTED) == 4
    assert "ValueError: boom <redacted>" in output


def test_filter_attaches_to_any_handler() -> None:
    token = "lib-" + secrets.token_hex(16)
    register_secret(token)
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("library.user.test")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("token=%s", token)
    finally:
        logger.removeHandler(handler)
    assert output.getvalue() == f"token={REDACTED}\n"


def test_websockets_debug_routed_and_redacted_at_trace(stream: io.StringIO) -> None:
    token = "ws-" + secrets.token_hex(16)
    register_secret(token)
    setup_logging(6, stream=stream)
    logging.getLogger("websockets.client").debug("> access-token: %s", token)
    setup_logging(5, stream=stream)
    logging.getLogger("websockets.client").debug("hidden below trace")
    output = stream.getvalue()
    assert "> access-token: <redacted>" in output
    assert token not in output
    assert "hidden below trace" not in output


def test_reset_logging_restores_propagation(stream: io.StringIO) -> None:
    logger = logging.getLogger("localproxy")
    before = (logger.level, logger.propagate, list(logger.handlers))
    setup_logging(5, stream=stream)
    assert logger.propagate is False
    reset_logging()
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


async def test_real_websocket_handshake_headers_are_redacted_at_trace(stream: io.StringIO) -> None:
    """The real websockets client logs request headers at debug: the token must come out masked."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    token = "hs-" + secrets.token_hex(24)
    register_secret(token)
    setup_logging(6, stream=stream)
    request_seen = asyncio.get_running_loop().create_future()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if not request_seen.done():
            request_seen.set_result(head)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(InvalidStatus):
            await asyncio.wait_for(
                connect(f"ws://127.0.0.1:{port}/tunnel", additional_headers={"access-token": token}), 10
            )
        head = await asyncio.wait_for(request_seen, 10)
    finally:
        server.close()
        await server.wait_closed()
    assert token.encode() in head  # the token really went over the wire
    output = stream.getvalue()
    assert "> access-token: <redacted>" in output
    assert token not in output
