"""Real networks: idle middleboxes, half-open links, reconnects (issue 11).

The proxies reach the emulator through ``impair.Forwarder`` (tests/impair.py), a
loopback forwarder that can idle-kill, blackhole and cut connections. Every wait
is bounded; the one long test idles 20 s on purpose (that is the behaviour tested).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import socket
import time
from contextlib import AsyncExitStack
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest
from impair import Forwarder
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from localproxy.config.proxy_config import ProxyConfig
from localproxy.emulator import Emulator
from localproxy.events import Connected, Disconnected
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.types import Mode, ServiceEndpoint, SourcePort
from localproxy.websocket.keepalive import (
    DEAD_AFTER_PERIODS,
    MAX_UNANSWERED_PINGS,
    KeepaliveConnection,
    Liveness,
)
from localproxy.websocket.session import open_session
from localproxy.wire.codec import Message, MessageType, encode_frame

TIMEOUT = 10.0
V3 = "aws.iot.securetunneling-3.0"


# --- the pure policy -------------------------------------------------------------------


def test_liveness_unarmed_never_dies() -> None:
    """Before the service answered a ping, silence proves nothing (PROTOCOL.md 4.6)."""
    liveness = Liveness(1.0, now=0.0)
    assert liveness.deadline() is None
    assert liveness.verdict(3600.0) is None


def test_liveness_armed_dies_after_three_silent_periods() -> None:
    liveness = Liveness(2.0, now=0.0)
    liveness.pong(1.0)
    assert liveness.deadline() == 1.0 + DEAD_AFTER_PERIODS * 2.0
    liveness.received(5.0)  # any bytes count, not only pongs
    assert liveness.verdict(10.9) is None
    reason = liveness.verdict(11.0)
    assert reason is not None and "3 ping periods" in reason and "6.0 s" in reason


# --- helpers -----------------------------------------------------------------------------


async def start_pair(stack: AsyncExitStack, emulator: Emulator, endpoint: str, rel_kit: Any,
                     **settings: Any) -> tuple[Any, Any]:
    """A source and a destination LocalProxy (echo app) whose websockets go to ``endpoint``."""
    app = await rel_kit.App("echo").start()
    stack.push_async_callback(app.close)
    tunnel = emulator.open_tunnel(services=["SSH"])
    where = SimpleNamespace(data_url=endpoint)
    proxy_settings = rel_kit.settings(**settings)
    dst = LocalProxy(rel_kit.config(Mode.DESTINATION, tunnel.destination_token, where, {"SSH": app.target()},
                                    settings=proxy_settings))
    src = LocalProxy(rel_kit.config(Mode.SOURCE, tunnel.source_token, where, {"SSH": SourcePort(0)},
                                    settings=proxy_settings))
    pair = rel_kit.Pair(emulator, tunnel, src, dst)
    dst.subscribe(pair.dst_events.append)
    src.subscribe(pair.src_events.append)
    await stack.enter_async_context(dst)
    await stack.enter_async_context(src)
    await asyncio.wait_for(asyncio.gather(dst.ready, src.ready), TIMEOUT)
    await pair.wait_serving()
    return pair, app


def sessions(events: list[Any]) -> int:
    return sum(isinstance(event, Connected) for event in events)


async def wait_for(check: Any, timeout: float) -> None:
    """Bounded poll of state that has no event of its own (proxy sessions, ports)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.02)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> str:
    """How a local connection ended: "reset", or "eof after N bytes" (N more bytes came first)."""
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return "reset"
    return f"eof after {len(data)} bytes"


# What a client of a lost session sees: the proxy aborts the socket (asyncio's abort
# sends a FIN, or a RST if bytes were unread), nothing more arrives.
ENDED = ("reset", "eof after 0 bytes")


# --- keepalive through middleboxes -------------------------------------------------------


async def test_idle_tunnel_survives_idle_killing_middleboxes(rel_kit: Any) -> None:
    """1 s pings, a 3 s idle-kill forwarder and the emulator's 3 s idle timeout: 20 s idle, no reconnect."""
    async with AsyncExitStack() as stack:
        emulator = await stack.enter_async_context(Emulator(idle_timeout=3.0))
        forwarder = await stack.enter_async_context(Forwarder(emulator.port, idle_kill=3.0))
        pair, app = await start_pair(stack, emulator, forwarder.url, rel_kit, ping_period_ms=1000)
        await asyncio.sleep(20)  # the idle period under test, not a wait for readiness
        assert forwarder.idle_kills == 0
        assert (sessions(pair.src_events), sessions(pair.dst_events)) == (1, 1)
        assert not any(isinstance(e, Disconnected) for e in pair.src_events + pair.dst_events)
        assert await pair.echo_roundtrip(b"still here" * 1000) == b"still here" * 1000


async def test_without_pings_the_middlebox_kills_the_idle_websocket(rel_kit: Any) -> None:
    """The control for the test above: pings every 60 s lose to a 1 s idle kill (and the proxy reconnects)."""
    async with AsyncExitStack() as stack:
        emulator = await stack.enter_async_context(Emulator())
        forwarder = await stack.enter_async_context(Forwarder(emulator.port, idle_kill=1.0))
        pair, app = await start_pair(stack, emulator, forwarder.url, rel_kit, ping_period_ms=60000)
        await forwarder.wait(lambda: forwarder.idle_kills >= 2, TIMEOUT)
        await wait_for(lambda: sessions(pair.src_events) >= 2 and sessions(pair.dst_events) >= 2, TIMEOUT)


async def test_blackholed_link_is_declared_dead_and_the_proxy_reconnects(
    rel_kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localproxy")
    async with AsyncExitStack() as stack:
        emulator = await stack.enter_async_context(Emulator())
        forwarder = await stack.enter_async_context(Forwarder(emulator.port))
        pair, app = await start_pair(stack, emulator, forwarder.url, rel_kit, ping_period_ms=1000)
        reader, writer = await pair.connect()
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), TIMEOUT) == b"before"
        # Both proxies had a pong back: dead-link detection is armed.
        await wait_for(lambda: sum("the service answers pings" in r.getMessage() for r in caplog.records) >= 2,
                       TIMEOUT)
        started = time.monotonic()
        assert forwarder.blackhole() == 2  # both websockets now lead nowhere, sockets open
        # Within 3 ping periods (+1 s of checks) each proxy gives up on its websocket and reconnects.
        await wait_for(lambda: sessions(pair.src_events) >= 2 and sessions(pair.dst_events) >= 2, 10.0)
        reconnected_after = time.monotonic() - started
        assert reconnected_after < 10.0
        # The connection of the lost session was closed with it, not left half-dead.
        assert await read_until_closed(reader, timeout=1.0) in ENDED
        writer.close()
        await pair.wait_serving()
        assert await pair.echo_roundtrip(b"after" * 5000) == b"after" * 5000
    dead = [r.getMessage() for r in caplog.records if "the link is dead" in r.getMessage()]
    assert any("closing it and reconnecting" in line for line in dead), dead
    ended = [r.getMessage() for r in caplog.records if "Websocket session with" in r.getMessage()]
    assert any("the link is dead" in line for line in ended), ended


# --- a service that never answers pings (before the peer connects) -----------------------


async def silent_service() -> tuple[asyncio.Server, list[asyncio.StreamWriter]]:
    """Accepts the upgrade, then swallows every byte: never a pong, never a frame."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: " + V3.encode() + b"\r\n\r\n")
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, writers


async def test_a_service_that_never_answered_a_ping_is_not_declared_dead() -> None:
    """PROTOCOL.md 4.6: the service may not answer pings before the peer connects."""
    server, writers = await silent_service()
    port = server.sockets[0].getsockname()[1]
    config = ProxyConfig(mode=Mode.SOURCE, access_token="t" * 40, endpoint=ServiceEndpoint.parse(f"ws://127.0.0.1:{port}"),
                         services={"SSH": SourcePort(0)}, settings=Settings(ping_period_ms=100))
    try:
        ws, _ = await open_session(config, access_token="t" * 40, client_token="c" * 40)
        try:
            # 15 ping periods, 5 times the dead-link limit: pings went out, nothing came back.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 1.5)
            assert ws.dead_reason is None and ws.liveness is not None and not ws.liveness.armed
            pending = getattr(ws, "pending_pings", None) or ws.pong_waiters  # websockets >= 16 / 15
            assert 0 < len(pending) <= MAX_UNANSWERED_PINGS  # unanswered pings do not pile up
        finally:
            ws.transport.abort()
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def test_backpressure_from_the_service_is_not_a_dead_link() -> None:
    """A service that stops reading us (its peer is slow) answers no ping, yet is alive."""

    async def handler(connection: Any) -> None:  # never reads: its small queue fills, then the socket
        await connection.wait_closed()

    # Small socket buffers on both ends: the stall comes after a few MiB, not after tens.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited by the accepted socket
    listener.bind(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    async with serve(handler, sock=listener, max_queue=1, compression=None) as server:
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, server.sockets[0].getsockname())
        ws = await asyncio.wait_for(connect("ws://127.0.0.1/", sock=client, create_connection=KeepaliveConnection,
                                            ping_interval=0.2, ping_timeout=None, compression=None), TIMEOUT)
        await wait_for(lambda: ws.liveness is not None and ws.liveness.armed, TIMEOUT)  # pongs came back

        async def upload() -> None:
            for _ in range(100):  # bounded: 50 MiB, far more than the socket buffers take
                await ws.send(bytes(512 * 1024))

        sending = asyncio.create_task(upload())
        try:
            await wait_for(lambda: ws.transport.get_write_buffer_size() > 0, TIMEOUT)  # stalled
            with pytest.raises(asyncio.TimeoutError):  # over 3 times the 0.6 s dead-link limit
                await asyncio.wait_for(ws.wait_closed(), 2.0)
            assert ws.dead_reason is None and not sending.done()
        finally:
            sending.cancel()
            ws.transport.abort()
            for connection in server.connections:  # it does not read: it would not see the reset
                connection.transport.abort()


# --- the emulator's idle timeout -----------------------------------------------------------


@pytest.fixture
async def idle_emulator() -> AsyncIterator[Emulator]:
    async with Emulator(idle_timeout=0.5) as emu:
        yield emu


async def open_raw(emulator: Emulator, token: str, ping_interval: float | None) -> Any:
    url = f"{emulator.data_url}/tunnel?local-proxy-mode=source"
    return await asyncio.wait_for(
        connect(url, additional_headers=[("access-token", token)], subprotocols=[V3],  # type: ignore[list-item]
                compression=None, ping_interval=ping_interval, ping_timeout=None),
        TIMEOUT,
    )


async def test_emulator_idle_timeout_aborts_a_silent_websocket(idle_emulator: Emulator) -> None:
    tunnel = idle_emulator.open_tunnel(services=["SSH"])
    ws = await open_raw(idle_emulator, tunnel.source_token, None)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        for _ in range(100):  # SERVICE_IDS, then nothing until the abort
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert 0.4 < time.monotonic() - started < 5
    assert ws.close_code is None or ws.close_code == 1006  # aborted: no close frame


async def test_emulator_idle_timeout_spares_a_pinging_websocket(idle_emulator: Emulator) -> None:
    tunnel = idle_emulator.open_tunnel(services=["SSH"])
    ws = await open_raw(idle_emulator, tunnel.source_token, 0.1)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), 1.5)  # three idle timeouts: pings keep it up
    finally:
        await ws.close()


def test_emulator_cli_rejects_a_bad_idle_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    from localproxy.emulator.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--idle-timeout", "0"])
    assert exited.value.code == 2
    assert "--idle-timeout must be a positive number of seconds" in capsys.readouterr().err


# --- after a reconnect ---------------------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "destination"])
async def test_after_a_reconnect_stale_ids_are_ignored_and_the_first_connection_works(
    emulator: Emulator, rel_kit: Any, side: str
) -> None:
    async with AsyncExitStack() as stack:
        pair, app = await start_pair(stack, emulator, emulator.data_url, rel_kit)
        reader, writer = await pair.connect()
        writer.write(b"x" * 1000)
        assert await asyncio.wait_for(reader.readexactly(1000), TIMEOUT) == b"x" * 1000
        tunnel_id = pair.tunnel.tunnel_id
        handshakes = emulator.handshake_count(tunnel_id, side)
        await emulator.drop(tunnel_id, side, abort=True)  # the link dies without a close frame
        # The lost session's connection at the source ends at once: closed by the source's own
        # session loss, or on the STREAM_RESET the service sends when the destination left.
        assert await read_until_closed(reader) in ENDED
        writer.close()
        await app.wait_received(0, 10**9)  # the destination side of it ended too
        assert app.closed[0].done()
        await wait_for(lambda: emulator.handshake_count(tunnel_id, side) > handshakes, TIMEOUT)
        await pair.wait_serving()
        # Frames of the old session's stream 1 arrive late, on both sides: ignored.
        stale = encode_frame(Message(MessageType.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"old"))
        for to in ("source", "destination"):
            await emulator.inject_raw(tunnel_id, to, stale)
        # The first new connection works, byte for byte.
        blob = bytes(range(256)) * 400
        assert await pair.echo_roundtrip(blob) == blob
        assert len(app.conns) == 2 and bytes(app.conns[1]) == blob
