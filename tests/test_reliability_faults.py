"""Faults injected through the emulator while data flows: every transfer completes intact
or fails loudly (both local ends closed), never corrupt, never hung; the tunnel serves
new connections afterwards.

Each transfer runs through an echo app: the app's received bytes and the client's
echoed bytes must each be a prefix of what the client sent (sha256 of the whole
when complete). The emulator's bandwidth cap keeps the transfer in flight while the
fault hits; every wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any, Awaitable, Callable

import pytest

from localproxy.errors import HandshakeRejectedError, ServiceUnavailableError
from localproxy.events import ErrorEvent, StreamStarted
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.types import Mode
from localproxy.wire.codec import Message, MessageType, encode_frame

TIMEOUT = 10.0
MIB = 1024 * 1024
BLOB = os.urandom(6 * MIB + 4321)


class Transfer:
    """The client of one echo transfer: writes ``data``, reads the echo until EOF/reset."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.data = data
        self.echoed = bytearray()
        self.writer = writer
        self._reader = reader
        self._writing = asyncio.create_task(self._write())
        self.ended = asyncio.create_task(self._read())

    async def _write(self) -> None:
        try:
            self.writer.write(self.data)
            await self.writer.drain()
        except ConnectionError:
            pass  # the reader side reports the end

    async def _read(self) -> bool:
        """True: all echoed; False: the connection ended (EOF or reset) before."""
        try:
            while len(self.echoed) < len(self.data):
                chunk = await self._reader.read(262144)
                if not chunk:
                    return False
                self.echoed += chunk
            return True
        except ConnectionError:
            return False
        finally:
            self._writing.cancel()
            self.writer.close()


def assert_prefix(received: bytes | bytearray, sent: bytes, where: str) -> None:
    assert len(received) <= len(sent), f"{where}: more bytes than were sent"
    assert hashlib.sha256(received).digest() == hashlib.sha256(sent[: len(received)]).digest(), (
        f"{where}: {len(received)} bytes received are not what was sent: corrupted"
    )


async def start_transfer(pair: Any, app: Any, data: bytes = BLOB) -> Transfer:
    reader, writer = await pair.connect()
    return Transfer(reader, writer, data)


async def check_fails_loudly(transfer: Transfer, app: Any, index: int) -> None:
    """Both ends closed in bounded time; whatever arrived is an uncorrupted prefix."""
    complete = await asyncio.wait_for(transfer.ended, TIMEOUT)
    await asyncio.wait_for(app.closed[index], TIMEOUT)
    assert_prefix(app.conns[index], transfer.data, "destination app")
    assert_prefix(transfer.echoed, transfer.data, "source client")
    if complete:  # the fault came too late to matter: then all of it must be intact
        assert bytes(transfer.echoed) == transfer.data


async def check_serves_again(pair: Any, app: Any) -> None:
    await pair.wait_serving()
    data = os.urandom(MIB + 17)
    transfer = await start_transfer(pair, app, data)
    assert await asyncio.wait_for(transfer.ended, TIMEOUT), "a new connection after the fault did not complete"
    assert bytes(transfer.echoed) == data
    assert bytes(app.conns[-1]) == data


async def in_flight(pair: Any, app: Any, rate: float = 4 * MIB) -> Transfer:
    """A transfer paced by the emulator, at least 256 KiB into the app when this returns."""
    pair.emulator.set_bandwidth(rate)
    transfer = await start_transfer(pair, app)
    await app.wait_received(len(app.conns) - 1 if app.conns else 0, 256 * 1024)
    assert not transfer.ended.done()
    return transfer


def stream_id_of(pair: Any) -> int:
    starts = [e for e in pair.src_events if isinstance(e, StreamStarted)]
    assert starts, "no stream started"
    return int(starts[-1].stream_id)


Fault = Callable[[Any], Awaitable[None]]


async def drop_source(pair: Any) -> None:
    await pair.emulator.drop(pair.tunnel.tunnel_id, "source")


async def drop_destination(pair: Any) -> None:
    await pair.emulator.drop(pair.tunnel.tunnel_id, "destination")


async def cut_source_tcp(pair: Any) -> None:
    await pair.emulator.drop(pair.tunnel.tunnel_id, "source", abort=True)


async def session_reset_both(pair: Any) -> None:
    for side in ("source", "destination"):
        await pair.emulator.send_session_reset(pair.tunnel.tunnel_id, side)


async def stream_reset_both(pair: Any) -> None:
    stream_id = stream_id_of(pair)
    for side in ("source", "destination"):
        await pair.emulator.send_stream_reset(pair.tunnel.tunnel_id, side, stream_id, "SSH")


async def connection_reset_both(pair: Any) -> None:
    frame = encode_frame(Message(MessageType.CONNECTION_RESET, stream_id=stream_id_of(pair), service_id="SSH",
                                 connection_id=1))
    for side in ("source", "destination"):
        await pair.emulator.inject_raw(pair.tunnel.tunnel_id, side, frame)


# Session-wide faults, and resets as the service sends them on its own (to both ends).
FAULTS: dict[str, Fault] = {
    "drop-source": drop_source,
    "drop-destination": drop_destination,
    "cut-source-tcp": cut_source_tcp,
    "session-reset": session_reset_both,
    "stream-reset": stream_reset_both,
    "connection-reset": connection_reset_both,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_mid_transfer_fails_loudly_then_serves(emulator: Any, rel_kit: Any, rel_pair_factory: Any,
                                                           fault: str) -> None:
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    await FAULTS[fault](pair)
    emulator.set_bandwidth(None)
    await check_fails_loudly(transfer, app, 0)
    assert len(app.conns[0]) < len(BLOB)  # the fault did cut it short (the cap kept it in flight)
    await check_serves_again(pair, app)
    await app.close()


@pytest.mark.parametrize("kind", ["session", "stream"])
async def test_reset_to_the_source_only(emulator: Any, rel_kit: Any, rel_pair_factory: Any, kind: str) -> None:
    """A reset reaching only the source (as when the destination sent it): the client is closed
    at once; the destination's app connection ends with the next STREAM_START of the service."""
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    if kind == "session":
        await emulator.send_session_reset(pair.tunnel.tunnel_id, "source")
    else:
        await emulator.send_stream_reset(pair.tunnel.tunnel_id, "source", stream_id_of(pair), "SSH")
    emulator.set_bandwidth(None)
    assert not await asyncio.wait_for(transfer.ended, TIMEOUT)
    assert_prefix(transfer.echoed, transfer.data, "source client")
    await check_serves_again(pair, app)
    assert app.closed[0].done()
    assert_prefix(app.conns[0], transfer.data, "destination app")
    await app.close()


async def test_reset_to_the_destination_only(emulator: Any, rel_kit: Any, rel_pair_factory: Any) -> None:
    """A STREAM_RESET reaching only the destination: the destination answers the source's next DATA
    for that stream with a STREAM_RESET, so the client is closed and the next connection is served."""
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    await emulator.send_stream_reset(pair.tunnel.tunnel_id, "destination", stream_id_of(pair), "SSH")
    emulator.set_bandwidth(None)
    try:
        await asyncio.wait_for(app.closed[0], TIMEOUT)
        assert not await asyncio.wait_for(transfer.ended, 3)
        assert await asyncio.wait_for(pair.echo_roundtrip(b"next connection"), 3) == b"next connection"
    finally:
        await app.close()


@pytest.mark.parametrize("stale", ["stream-reset", "connection-reset", "data"])
async def test_stale_frames_mid_transfer_change_nothing(emulator: Any, rel_kit: Any, rel_pair_factory: Any,
                                                        stale: str) -> None:
    """Resets and DATA for another stream or connection id are dropped: the transfer completes intact."""
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app, rate=16 * MIB)
    stream_id = stream_id_of(pair)
    frames = {
        "stream-reset": Message(MessageType.STREAM_RESET, stream_id=stream_id + 7, service_id="SSH"),
        "connection-reset": Message(MessageType.CONNECTION_RESET, stream_id=stream_id, service_id="SSH",
                                    connection_id=9),
        "data": Message(MessageType.DATA, stream_id=stream_id + 1, service_id="SSH", payload=b"intruder"),
    }
    for side in ("source", "destination"):
        await emulator.inject_raw(pair.tunnel.tunnel_id, side, encode_frame(frames[stale]))
    emulator.set_bandwidth(None)
    assert await asyncio.wait_for(transfer.ended, TIMEOUT)
    assert bytes(transfer.echoed) == BLOB
    assert bytes(app.conns[0]) == BLOB
    await app.close()


async def test_5xx_burst_on_reconnect_is_retried_then_serves(emulator: Any, rel_kit: Any,
                                                              rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    emulator.fail_next_handshakes(5, status=503)
    await drop_source(pair)
    await drop_destination(pair)
    emulator.set_bandwidth(None)
    await check_fails_loudly(transfer, app, 0)
    await check_serves_again(pair, app)
    refused = [e for e in pair.src_events + pair.dst_events
               if isinstance(e, ErrorEvent) and isinstance(e.error, ServiceUnavailableError)]
    assert len(refused) == 5 and not any(e.fatal for e in refused)
    assert emulator.handshake_count(pair.tunnel.tunnel_id, "source") == 2
    assert emulator.handshake_count(pair.tunnel.tunnel_id, "destination") == 2
    await app.close()


async def test_destination_replaced_by_rotated_token(emulator: Any, rel_kit: Any, rel_pair_factory: Any) -> None:
    """Rotation kicks the old destination (it then exits: its token is revoked); a new one serves."""
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    tokens = emulator.rotate(pair.tunnel.tunnel_id, "DESTINATION", services=["SSH"])
    emulator.set_bandwidth(None)
    await check_fails_loudly(transfer, app, 0)
    with pytest.raises(HandshakeRejectedError):
        await asyncio.wait_for(pair.dst.wait_closed(), TIMEOUT)
    config = rel_kit.config(Mode.DESTINATION, tokens["destinationAccessToken"], emulator, {"SSH": app.target()})
    async with LocalProxy(config) as replacement:
        await asyncio.wait_for(replacement.ready, TIMEOUT)
        await check_serves_again(pair, app)
    await app.close()


async def test_destination_replaced_by_same_client_token(emulator: Any, rel_kit: Any,
                                                         rel_pair_factory: Any) -> None:
    """A second destination with the same token and client token takes over; the first serves
    again once the second stops. Meanwhile the two replace each other at every reconnect:
    transfers caught in that fail loudly."""
    client_token = "reliability-client-token-0123456789"
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app}, client_tokens=(None, client_token))
    transfer = await in_flight(pair, app)
    mark = emulator.event_mark()
    config = rel_kit.config(Mode.DESTINATION, pair.tunnel.destination_token, emulator, {"SSH": app.target()})
    async with LocalProxy(config, client_token=client_token) as second:
        await asyncio.wait_for(second.ready, TIMEOUT)
        await emulator.wait_event("replaced", since=mark, tunnel_id=pair.tunnel.tunnel_id, side="destination")
        emulator.set_bandwidth(None)
        await check_fails_loudly(transfer, app, 0)
    await check_serves_again(pair, app)
    await app.close()


async def test_destination_service_refusing(emulator: Any, rel_kit: Any, rel_pair_factory: Any) -> None:
    """Connections to a service whose app refuses are closed promptly; other services go on."""
    app = await rel_kit.App("echo").start()
    refusing = await rel_kit.App("echo").start()
    await refusing.close()  # nothing listens on its port any more
    pair = await rel_pair_factory(emulator, {"SSH": app, "DOWN": refusing})
    long_lived = await start_transfer(pair, app, os.urandom(MIB))
    for _ in range(3):
        reader, writer = await pair.connect("DOWN")
        writer.write(b"hello?")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    assert await asyncio.wait_for(long_lived.ended, TIMEOUT)
    assert bytes(long_lived.echoed) == long_lived.data
    assert await pair.echo_roundtrip(b"still serving") == b"still serving"
    await app.close()


async def test_destination_app_resets_mid_transfer(emulator: Any, rel_kit: Any, rel_pair_factory: Any) -> None:
    """The local app on the destination aborts: the source client is closed, nothing corrupt."""
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    transfer = await in_flight(pair, app)
    app.abort_connections()
    emulator.set_bandwidth(None)
    assert not await asyncio.wait_for(transfer.ended, TIMEOUT)
    assert_prefix(transfer.echoed, transfer.data, "source client")
    await app.wait_received(0, len(BLOB))
    assert_prefix(app.conns[0], transfer.data, "destination app")
    await check_serves_again(pair, app)
    await app.close()
