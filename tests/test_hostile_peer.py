"""Issue 22, items 1-3: a hostile service cannot grow the proxy's memory, listeners or logs.

A hostile websocket server written here (localproxy.testing.hostile: plain
``websockets`` on 127.0.0.1 speaking the tunnel protocol with localproxy.wire.codec)
floods a real LocalProxy; every flood is bounded in count and time, and the test
asserts the bound through the proxy's own counters and the log records it made.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import AsyncExitStack
from typing import Any

import pytest

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import ConfigError
from localproxy.events import Disconnected, Event
from localproxy.ops.ratelimit import BURST
from localproxy.proxy.engine import MAX_UNSENT_CONTROL
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.testing.hostile import HostileService, Session, ping_frames
from localproxy.testing.processes import echo_app
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort
from localproxy.websocket.keepalive import MAX_UNSENT
from localproxy.wire.codec import Message, MessageType

T = MessageType
FAST = Settings(retry_delay_ms=50, ping_period_ms=60_000, tcp_connection_retry_count=0)


def config(url: str, mode: Mode, services: dict[str, Any], settings: Settings = FAST) -> ProxyConfig:
    return ProxyConfig(
        mode=mode,
        access_token="AQGAAHostileTestToken",
        endpoint=ServiceEndpoint.parse(url),
        services=services,
        bind_address="127.0.0.1",
        settings=settings,
    )


class Records(logging.Handler):
    """The records the proxy made, and an event per matching message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._waiters: list[tuple[re.Pattern[str], asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        message = record.getMessage()
        for pattern, event in self._waiters:
            if pattern.search(message):
                event.set()

    def matching(self, pattern: str) -> list[str]:
        compiled = re.compile(pattern)
        return [r.getMessage() for r in self.records if compiled.search(r.getMessage())]

    async def wait_for(self, pattern: str, timeout: float = 15.0) -> None:
        compiled = re.compile(pattern)
        if self.matching(pattern):
            return
        event = asyncio.Event()
        self._waiters.append((compiled, event))
        await asyncio.wait_for(event.wait(), timeout)


@pytest.fixture
def records() -> Any:
    handler = Records()
    logger = logging.getLogger("localproxy")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


async def started(stack: AsyncExitStack, cfg: ProxyConfig) -> LocalProxy:
    proxy = await stack.enter_async_context(LocalProxy(cfg))
    return proxy


# --- item 1: ping flood while the service does not read ------------------------------------


async def test_ping_flood_ends_the_session_at_the_bound_and_reconnects(records: Records) -> None:
    app, app_port = await echo_app()
    async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
        stack.callback(app.close)
        proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", app_port)}))
        first = await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        first.stop_reading()
        burst = ping_frames(1000)  # 127 KiB of pings: each asks for a 131-byte pong
        flood = asyncio.ensure_future(first.flood(burst, seconds=30, max_count=2000))
        await records.wait_for(r"bytes wait unsent \(bound")
        second = await service.next_session()  # the session ended this way reconnects
        sent = await flood
        assert sent < 2000  # the proxy cut it off before the flood ran out
        # The write buffer never held much more than the bound (pongs of one read at most).
        assert MAX_UNSENT < proxy.unsent_peak <= MAX_UNSENT + 512 * 1024
        assert proxy.stats().frames_dropped.get("pong_overflow") == 1
        await second.send(Message(T.STREAM_START, 1, service_id="SSH", connection_id=1))
        await second.send(Message(T.DATA, 1, payload=b"ping?", service_id="SSH", connection_id=1))
        await _wait_for_data(second, b"ping?")  # the new session serves (echo app)
    (line,) = records.matching(r"^Websocket: .*bytes wait unsent")
    assert "closing it and reconnecting" in line


async def test_dead_link_rule_fires_when_the_buffer_never_drains(records: Records) -> None:
    """Pings until our buffer holds more than our own data could (under the bound), then silence."""
    app, app_port = await echo_app()
    settings = Settings(retry_delay_ms=50, ping_period_ms=300)
    async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
        stack.callback(app.close)
        target = {"SSH": DestinationTarget("127.0.0.1", app_port)}
        proxy = await started(stack, config(service.url, Mode.DESTINATION, target, settings))
        first = await service.next_session()
        await records.wait_for(r"the service answers pings")  # armed: silence can mean dead now
        first.stop_reading()
        transport = proxy._ws.transport
        for _ in range(400):  # 64 KiB of pongs per step, until over half the bound
            if transport.get_write_buffer_size() > MAX_UNSENT // 2 + 64 * 1024:
                break
            first.write_raw(ping_frames(500))
            await asyncio.sleep(0.01)  # (pacing the flood so the proxy reads it step by step)
        size = transport.get_write_buffer_size()
        assert MAX_UNSENT // 2 < size <= MAX_UNSENT  # not the overflow rule: the dead-link one
        await records.wait_for(r"the link is dead")
        await service.next_session()
    assert not records.matching(r"bytes wait unsent")


async def _wait_for_data(session: Session, payload: bytes, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if any(m.type == T.DATA and bytes(m.payload) == payload for m in session.received):
            return
        await asyncio.sleep(0.02)  # polling what the service received (a list, no event)
    raise AssertionError(f"the service never received {payload!r}: {session.received[-5:]}")


# --- item 2: frames for streams never started, CONNECTION_START over the limit ------------------


async def test_data_for_one_unknown_stream_draws_one_reset_and_few_lines(records: Records) -> None:
    app, app_port = await echo_app()
    async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
        stack.callback(app.close)
        proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", app_port)}))
        session = await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        data = [Message(T.DATA, stream, payload=b"x" * 10, service_id="SSH", connection_id=1)
                for stream in (7, 8, 9) for _ in range(2000)]
        for chunk in range(0, len(data), 500):
            await session.send(*data[chunk:chunk + 500])
        await session.send(Message(T.STREAM_START, 10, service_id="SSH", connection_id=1))
        await session.send(Message(T.DATA, 10, payload=b"after", service_id="SSH", connection_id=1))
        await _wait_for_data(session, b"after")
        resets = [m.stream_id for m in session.received if m.type == T.STREAM_RESET]
        assert resets == [7, 8, 9]  # once per stream id, not per frame (6,000 frames)
    assert len(records.matching(r"which is not active here")) == 3


async def test_reset_flood_while_not_reading_ends_the_session_and_lines_are_limited(records: Records) -> None:
    app, app_port = await echo_app()
    async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
        stack.callback(app.close)
        proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", app_port)}))
        session = await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        session.stop_reading()
        # DATA for ever new stream ids: each draws one STREAM_RESET the service never takes.
        stream = iter(range(1, 10**7))

        async def flood() -> int:
            sent = 0
            for _ in range(400):  # 400 x 500 frames at most
                message = session.frames_message(
                    Message(T.DATA, next(stream), payload=b"x", service_id="SSH", connection_id=1) for _ in range(500)
                )
                sent += await session.flood(message, seconds=30, max_count=1)
                if session.transport.is_closing() or records.matching("answers wait to be sent"):
                    break
            return sent

        sent = await asyncio.wait_for(flood(), 60)
        await records.wait_for(r"answers wait to be sent \(bound")
        second = await service.next_session()
        assert sent >= 1
        assert proxy.stats().frames_dropped.get("reply_overflow") == 1
        assert f"bound {MAX_UNSENT_CONTROL:,}" in records.matching("answers wait")[0]
        await second.send(Message(T.STREAM_START, 1, service_id="SSH", connection_id=1))
        await second.send(Message(T.DATA, 1, payload=b"still?", service_id="SSH", connection_id=1))
        await _wait_for_data(second, b"still?")
    # Thousands of answered streams, a handful of lines (+ the summary when the proxy stops).
    answered = records.matching(r"which is not active here")
    assert BURST <= len(answered) <= 2 * BURST + 2, len(answered)
    assert any(re.search(r"\.\.\. [\d,]+ more in the last [\d.]+ s", line) for line in answered)


async def test_connection_start_over_the_limit_is_answered_with_few_lines(records: Records) -> None:
    app, app_port = await echo_app()
    settings = Settings(retry_delay_ms=50, ping_period_ms=60_000, tcp_max_active_connections=2)
    async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
        stack.callback(app.close)
        proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", app_port)}, settings))
        session = await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        await session.send(Message(T.STREAM_START, 1, service_id="SSH", connection_id=1))
        starts = [Message(T.CONNECTION_START, 1, service_id="SSH", connection_id=c) for c in range(2, 3002)]
        for chunk in range(0, len(starts), 500):
            await session.send(*starts[chunk:chunk + 500])
        await session.send(Message(T.DATA, 1, payload=b"alive", service_id="SSH", connection_id=1))
        await _wait_for_data(session, b"alive")
        assert proxy.stats().active_connections.get("SSH", 0) <= 2  # the cap holds
        resets = [m for m in session.received if m.type == T.CONNECTION_RESET]
        assert len(resets) == 2999  # one answer per start (the protocol's), queued bounded
    limited = records.matching(r"tcp\.max_active_connections")
    assert BURST <= len(limited) <= BURST + 2, len(limited)


# --- item 3: SERVICE_IDS naming 2,000 services ---------------------------------------------------

MANY = ("SSH", *(f"S{i}" for i in range(1999)))


async def test_source_listens_only_for_configured_services(records: Records) -> None:
    async with AsyncExitStack() as stack, HostileService(MANY) as service:
        proxy = await started(stack, config(service.url, Mode.SOURCE, {"SSH": SourcePort(0)}))
        await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        assert list(proxy.ports) == ["SSH"]
        assert len(proxy._engine._servers) == 1  # one service, one listener
    (line,) = records.matching(r"announces 1,999 service")
    assert line.endswith("S0, S1, S2, S3, S4 and 1,994 more") and len(line) < 300


async def test_source_without_mapping_listens_for_three_at_most(records: Records) -> None:
    async with AsyncExitStack() as stack, HostileService(MANY) as service:
        proxy = await started(stack, config(service.url, Mode.SOURCE, {}))
        await service.next_session()
        await asyncio.wait_for(proxy.ready, 10)
        assert list(proxy.ports) == ["SSH", "S0", "S1"]
    (line,) = records.matching(r"announces 1,997 service")
    assert "beyond the 3 a tunnel may have" in line and len(line) < 300


async def test_destination_mismatch_error_is_capped() -> None:
    async with AsyncExitStack() as stack, HostileService(MANY) as service:
        proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", 9)}))
        with pytest.raises(ConfigError) as caught:
            await asyncio.wait_for(proxy.wait_closed(), 10)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "S0, S1, S2, S3, S4 and 1,994 more" in message and len(message) < 400


# --- item 4: forged log lines --------------------------------------------------------------------

FORGED = "bye\n[2026-01-01T00:00:00.000000]{1}[error]   FORGED\x1b[2J"


@pytest.mark.parametrize("log_format", ["reference", "json"])
async def test_peer_text_cannot_forge_log_lines(log_format: str) -> None:
    import io
    import json

    from localproxy.ops.logs import reset_logging, setup_logging

    stream = io.StringIO()
    setup_logging(5, stream, log_format=log_format)
    events: list[Event] = []
    try:
        async with AsyncExitStack() as stack, HostileService(("SSH",)) as service:
            proxy = await started(stack, config(service.url, Mode.DESTINATION, {"SSH": DestinationTarget("127.0.0.1", 9)}))
            proxy.subscribe(events.append)
            session = await service.next_session()
            await asyncio.wait_for(proxy.ready, 10)
            await session.send(Message(T.STREAM_START, 1, service_id="EVIL\nFORGED\x1b[31m"))
            await session.ws.close(1000, FORGED)
            await service.next_session()
    finally:
        reset_logging()
    assert any(isinstance(e, Disconnected) for e in events)
    text = stream.getvalue()
    assert "\x1b" not in text if log_format == "reference" else True
    lines = text.splitlines()
    if log_format == "reference":
        assert all(re.match(r"\[\d{4}-\d\d-\d\dT[\d:.]+\]\{\d+\}\[\w+\]", line) for line in lines), lines
        assert any("bye\\n[2026-01-01T00:00:00.000000]{1}[error]   FORGED\\x1b[2J" in line for line in lines)
        assert any("EVIL\\nFORGED\\x1b[31m" in line for line in lines)
    else:
        messages = [json.loads(line)["message"] for line in lines]
        assert any(FORGED in message for message in messages)  # JSON keeps the text, escaped by JSON
        assert any("EVIL\nFORGED\x1b[31m" in message for message in messages)
