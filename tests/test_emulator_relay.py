"""The emulator's data plane: handshakes, token rules, relay, wire rules, faults.

Clients are the real ``websockets`` client over loopback (TLS where marked).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import shutil
import ssl
import subprocess
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from localproxy.emulator import Emulator
from localproxy.emulator.gate import FrameGate
from localproxy.emulator.handshake import ACCESS_TOKEN_USED, CLIENT_TOKEN_MISMATCH
from localproxy.wire.codec import (
    MAX_WS_MESSAGE,
    FrameDecoder,
    Message,
    MessageType,
    encode_frame,
)

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"
CLIENT_TOKEN = "c" * 40
OTHER_CLIENT_TOKEN = "d" * 40

Headers = list[tuple[str, str]]


async def open_ws(
    emu: Emulator,
    side: str,
    token: str | None,
    *,
    client_token: str | None = None,
    subprotocols: list[str] | None = None,
    extra: Headers | None = None,
    path: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ClientConnection:
    headers: Headers = []
    if token is not None:
        headers.append(("access-token", token))
    if client_token is not None:
        headers.append(("client-token", client_token))
    headers += extra or []
    url = emu.data_url + (path if path is not None else f"/tunnel?local-proxy-mode={side}")
    ws = await asyncio.wait_for(
        connect(
            url,
            additional_headers=headers,
            subprotocols=[V3] if subprotocols is None else subprotocols,  # type: ignore[arg-type]
            ssl=ssl_context,
            compression=None,
            max_size=None,
        ),
        10,
    )
    return ws


async def refused(emu: Emulator, side: str, token: str | None, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
    with pytest.raises(InvalidStatus) as caught:
        await open_ws(emu, side, token, **kwargs)
    response = caught.value.response
    return response.status_code, bytes(response.body or b"").decode(), dict(response.headers.raw_items())


def frame(kind: MessageType, **fields: Any) -> bytes:
    return encode_frame(Message(kind, **fields))


async def read_messages(ws: ClientConnection, count: int, decoder: FrameDecoder | None = None) -> list[Message]:
    decoder = decoder or FrameDecoder()
    messages: list[Message] = []
    async with asyncio.timeout(10):
        while len(messages) < count:
            messages += decoder.feed(await ws.recv())
    return messages


async def connected_pair(
    emu: Emulator, services: list[str] | None = None, *, src_protocols: list[str] | None = None, dst_protocols: list[str] | None = None
) -> tuple[Any, ClientConnection, ClientConnection]:
    tunnel = emu.open_tunnel(services=["SSH"] if services is None else services)
    dst = await open_ws(emu, "destination", tunnel.destination_token, subprotocols=dst_protocols)
    src = await open_ws(emu, "source", tunnel.source_token, subprotocols=src_protocols)
    for ws in (dst, src):
        if ws.subprotocol != V1:
            (ids,) = await read_messages(ws, 1)
            assert ids.type is MessageType.SERVICE_IDS
    await emu.wait_connected(tunnel.tunnel_id, "source")
    await emu.wait_connected(tunnel.tunnel_id, "destination")
    return tunnel, src, dst


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    await asyncio.wait_for(ws.wait_closed(), 10)
    close = ws.protocol.close_rcvd
    return (close.code, close.reason) if close is not None else (None, "")


# --- handshake ------------------------------------------------------------------


async def test_tls_session_with_trusted_ca(emulator_tls: Emulator, emulator_client_ssl: ssl.SSLContext) -> None:
    assert emulator_tls.data_url.startswith("wss://127.0.0.1:")
    tunnel = emulator_tls.open_tunnel(services=["SSH", "WEB"])
    ws = await open_ws(emulator_tls, "destination", tunnel.destination_token, ssl_context=emulator_client_ssl)
    assert ws.subprotocol == V3
    assert ws.response is not None and ws.response.headers["channel-id"]
    (ids,) = await read_messages(ws, 1)
    assert ids == Message(MessageType.SERVICE_IDS, available_service_ids=("SSH", "WEB"))
    await emulator_tls.wait_connected(tunnel.tunnel_id, "destination")
    assert emulator_tls.describe(tunnel.tunnel_id)["destinationConnectionState"]["status"] == "CONNECTED"
    await ws.close()
    await emulator_tls.wait_disconnected(tunnel.tunnel_id, "destination")
    assert emulator_tls.describe(tunnel.tunnel_id)["destinationConnectionState"]["status"] == "DISCONNECTED"


async def test_generated_ca_file_and_capath(tmp_path: Any) -> None:
    async with Emulator(tls=True, ca_out=tmp_path / "ca") as emu:
        assert emu.ca_pem_path is not None and emu.capath is not None
        (hashed,) = list(emu.capath.iterdir())
        if shutil.which("openssl"):
            out = subprocess.run(
                ["openssl", "x509", "-hash", "-noout", "-in", str(emu.ca_pem_path)],
                capture_output=True, text=True, timeout=10, check=True,
            )  # fmt: skip
            assert hashed.name == out.stdout.strip() + ".0"
        by_file = ssl.create_default_context(cafile=str(emu.ca_pem_path))
        by_dir = ssl.create_default_context(capath=str(emu.capath))
        tunnel = emu.open_tunnel()
        for context, side, token in ((by_file, "source", tunnel.source_token), (by_dir, "destination", tunnel.destination_token)):
            ws = await open_ws(emu, side, token, ssl_context=context)
            assert (await read_messages(ws, 1))[0].available_service_ids == ()
            await ws.close()
        untrusting = ssl.create_default_context()
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_ws(emu, "source", tunnel.source_token, ssl_context=untrusting)


async def test_cookie_token_and_subprotocol_choice(emulator: Emulator) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    ws = await open_ws(
        emulator, "source", None, subprotocols=[V1, V2], extra=[("Cookie", f"a=b; awsiot-tunnel-token={tunnel.source_token}")]
    )
    assert ws.subprotocol == V2  # the highest offered
    assert (await read_messages(ws, 1))[0].type is MessageType.SERVICE_IDS
    await ws.close()


def _long_header() -> Headers:
    return [("x-padding", "p" * 4096)]


@pytest.mark.parametrize(
    ("case", "status", "body"),
    [
        ("path", 400, "Invalid request path '/other': the data plane only serves GET /tunnel"),
        ("no-mode", 400, "Missing query parameter local-proxy-mode: use local-proxy-mode=source or destination"),
        ("bad-mode", 400, "Invalid local-proxy-mode 'src': use source or destination"),
        ("no-token", 400, "Missing access token: send it in the access-token header (or the awsiot-tunnel-token cookie)"),
        ("two-tokens", 400, "Invalid access token: exactly one access token is allowed, got 2"),
        ("token-and-cookie", 400, "Invalid access token: exactly one access token is allowed, got 2"),
        ("two-client-tokens", 400, "Invalid client token: at most one client-token header is allowed, got 2"),
        ("short-client-token", 400, "Invalid client token: it must be 32 to 128 characters of a-z, A-Z, 0-9 and '-'"),
        ("no-subprotocol", 400, "Unsupported subprotocol: offer one of aws.iot.securetunneling-3.0, aws.iot.securetunneling-2.0, aws.iot.securetunneling-1.0 in Sec-WebSocket-Protocol (offered: none)"),
        ("unknown-token", 400, "Invalid access token: the token is not known to the service (mistyped, or of a deleted tunnel)"),
        ("wrong-mode", 400, "Invalid access token: this is a destination access token but local-proxy-mode is source"),
        ("revoked", 400, "Invalid access token: the token was revoked by RotateTunnelAccessToken; use the new one"),
        ("closed", 400, "Invalid access token: the tunnel is closed (closed by CloseTunnel)"),
        ("huge-head", 431, "Request header fields too large: the upgrade request must stay under 4096 bytes"),
    ],
)
async def test_rejections(emulator: Emulator, case: str, status: int, body: str) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    token = tunnel.source_token
    kwargs: dict[str, Any] = {}
    if case == "path":
        kwargs["path"] = "/other?local-proxy-mode=source"
    elif case == "no-mode":
        kwargs["path"] = "/tunnel"
    elif case == "bad-mode":
        kwargs["path"] = "/tunnel?local-proxy-mode=src"
    elif case == "no-token":
        token = None
    elif case == "two-tokens":
        kwargs["extra"] = [("access-token", tunnel.source_token)]
    elif case == "token-and-cookie":
        kwargs["extra"] = [("Cookie", f"awsiot-tunnel-token={tunnel.source_token}")]
    elif case == "two-client-tokens":
        kwargs["client_token"] = CLIENT_TOKEN
        kwargs["extra"] = [("client-token", CLIENT_TOKEN)]
    elif case == "short-client-token":
        kwargs["client_token"] = "short"
    elif case == "no-subprotocol":
        kwargs["subprotocols"] = []
    elif case == "unknown-token":
        token = "x" * 200
    elif case == "wrong-mode":
        token = tunnel.destination_token
    elif case == "revoked":
        emulator.rotate(tunnel.tunnel_id, "SOURCE")
    elif case == "closed":
        emulator.close_tunnel(tunnel.tunnel_id)
    elif case == "huge-head":
        kwargs["extra"] = _long_header()
    got_status, got_body, headers = await refused(emulator, "source", token, **kwargs)
    assert (got_status, got_body) == (status, body)
    assert headers["channel-id"]
    assert tunnel.source_token not in got_body and tunnel.destination_token not in got_body
    assert emulator.handshake_count(tunnel.tunnel_id, "source") == 0
    if status == 400:
        event = await emulator.wait_event("handshake_rejected", body=body)
        assert event.detail["status"] == 400


async def test_single_use_token_is_spent_only_by_a_successful_handshake(emulator: Emulator) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    await refused(emulator, "source", tunnel.source_token, subprotocols=["chat"])
    emulator.fail_next_handshakes(2, status=503)
    for _ in range(2):
        status, body, _ = await refused(emulator, "source", tunnel.source_token)
        assert status == 503 and "fault injection" in body
    ws = await open_ws(emulator, "source", tunnel.source_token)
    assert emulator.handshake_count(tunnel.tunnel_id, "source") == 1
    await ws.close()
    await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    status, body, _ = await refused(emulator, "source", tunnel.source_token)
    assert (status, body) == (400, ACCESS_TOKEN_USED)
    # A client token cannot revive a token already spent without one.
    status, body, _ = await refused(emulator, "source", tunnel.source_token, client_token=CLIENT_TOKEN)
    assert (status, body) == (400, ACCESS_TOKEN_USED)


async def test_client_token_binds_and_reconnect_replaces_the_old_connection(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    await src.close()
    src = await open_ws(emulator, "source", emulator.rotate(tunnel.tunnel_id, "SOURCE")["sourceAccessToken"], client_token=CLIENT_TOKEN)
    token = emulator.tunnel(tunnel.tunnel_id).tokens["source"].value
    await read_messages(src, 1)
    await src.send(frame(MessageType.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    assert (await read_messages(dst, 1))[0].type is MessageType.STREAM_START

    again = await open_ws(emulator, "source", token, client_token=CLIENT_TOKEN)
    assert await closed_with(src) == (1000, "replaced by a new connection")
    # The destination hears that the replaced source's stream is gone.
    assert await read_messages(dst, 1) == [Message(MessageType.STREAM_RESET, stream_id=1, service_id="SSH")]
    await emulator.wait_event("replaced", tunnel_id=tunnel.tunnel_id, side="source")
    assert emulator.handshake_count(tunnel.tunnel_id, "source") == 3  # first token once, then twice
    await emulator.events.wait_until(lambda: emulator.sessions(tunnel.tunnel_id, "source") == 1, 10)
    assert emulator.describe(tunnel.tunnel_id)["sourceConnectionState"]["status"] == "CONNECTED"

    for other in (OTHER_CLIENT_TOKEN, None):
        status, body, _ = await refused(emulator, "source", token, client_token=other)
        assert (status, body) == (400, CLIENT_TOKEN_MISMATCH)
    await again.close()
    await dst.close()


async def test_rotation_disconnects_the_peer_and_resets_the_other_side(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    await src.send(frame(MessageType.STREAM_START, stream_id=7, service_id="SSH", connection_id=1))
    await read_messages(dst, 1)
    new = emulator.rotate(tunnel.tunnel_id, "SOURCE")
    assert set(new) == {"tunnelArn", "sourceAccessToken"}
    assert await closed_with(src) == (1000, "access token revoked by rotation")
    assert await read_messages(dst, 1) == [Message(MessageType.STREAM_RESET, stream_id=7, service_id="SSH")]
    await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    assert emulator.describe(tunnel.tunnel_id)["sourceConnectionState"]["status"] == "DISCONNECTED"
    src = await open_ws(emulator, "source", new["sourceAccessToken"])
    await read_messages(src, 1)
    await emulator.wait_connected(tunnel.tunnel_id, "source")
    assert dst.state is State.OPEN
    await src.close()
    await dst.close()


async def test_v1_gets_no_service_ids(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator, services=[], dst_protocols=[V1])
    assert dst.subprotocol == V1
    data = frame(MessageType.DATA, stream_id=1, payload=b"first")
    await src.send(data)
    assert await dst.recv() == data  # the first thing a V1 peer hears is the data
    await src.close()
    await dst.close()


# --- relay ----------------------------------------------------------------------


def data_stream(rng: random.Random, size: int, *, start: bool) -> tuple[bytes, bytes]:
    """(stream bytes, payload): DATA frames of random sizes, after a STREAM_START if ``start``."""
    payload = rng.randbytes(size)
    parts = [frame(MessageType.STREAM_START, stream_id=1, service_id="SSH", connection_id=1)] if start else []
    pos = 0
    while pos < size:
        cut = min(size, pos + rng.randint(1, 64512))
        parts.append(frame(MessageType.DATA, stream_id=1, connection_id=1, payload=payload[pos:cut]))
        pos = cut
    return b"".join(parts), payload


async def send_split(ws: ClientConnection, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        cut = min(len(data), pos + rng.choice([1, 2, 3, 100, 4096, 65537, MAX_WS_MESSAGE, rng.randint(1, MAX_WS_MESSAGE)]))
        await ws.send(view[pos:cut])
        pos = cut


async def receive_payload(ws: ClientConnection, size: int) -> bytes:
    decoder = FrameDecoder()
    received = bytearray()
    async with asyncio.timeout(30):
        while len(received) < size:
            message = await ws.recv()
            assert isinstance(message, bytes) and len(message) <= MAX_WS_MESSAGE
            FrameDecoder().feed(message)  # whole frames only: decodes on its own
            for decoded in decoder.feed(message):
                if decoded.type is MessageType.DATA:
                    received += decoded.payload
    return bytes(received)


async def test_relay_integrity_both_ways_with_random_splits(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    rng = random.Random(1234)
    up, up_payload = data_stream(rng, 3 << 20, start=True)
    down, down_payload = data_stream(rng, 2 << 20, start=False)
    results = await asyncio.gather(
        send_split(src, up, random.Random(1)),
        send_split(dst, down, random.Random(2)),
        receive_payload(dst, len(up_payload)),
        receive_payload(src, len(down_payload)),
    )
    assert hashlib.sha256(results[2]).hexdigest() == hashlib.sha256(up_payload).hexdigest()
    assert hashlib.sha256(results[3]).hexdigest() == hashlib.sha256(down_payload).hexdigest()
    await src.close()
    await dst.close()


def test_gate_forwards_whole_frames_whatever_the_split() -> None:
    rng = random.Random(7)
    stream, _ = data_stream(rng, 300_000, start=True)
    gate = FrameGate("source")
    out = bytearray()
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.randint(1, 70_000))
        result = gate.feed(stream[pos:cut])
        assert result.violation is None
        for chunk in result.chunks:
            assert len(chunk) <= MAX_WS_MESSAGE
            FrameDecoder().feed(chunk)
            out += chunk
        pos = cut
    assert bytes(out) == stream and gate.pending == 0


def test_gate_stops_at_a_bad_frame_split_across_messages() -> None:
    good = [frame(MessageType.DATA, stream_id=1, payload=bytes([n]) * 300) for n in range(3)]
    bad = frame(MessageType.SESSION_RESET)
    stream = b"".join(good) + bad + good[0]
    gate = FrameGate("source")
    first = gate.feed(stream[:450])  # good[0] whole, half of good[1]
    assert b"".join(first.chunks) == good[0] and first.violation is None
    second = gate.feed(stream[450:])  # rest of good[1], good[2], the bad frame, more
    assert b"".join(second.chunks) == good[1] + good[2]
    assert second.violation == "source sent SESSION_RESET, which only the service sends"
    assert gate.feed(good[0]).violation is not None and gate.broken


def _with_unknown_field(data: bytes) -> bytes:
    body = data[2:] + b"\x48\x01"  # field 9, varint 1: not in the schema
    return len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("side", "bad", "code", "reason"),
    [
        ("source", frame(MessageType.DATA, stream_id=0, payload=b"x"), 1008, "protocol violation: DATA with streamId 0"),
        ("source", frame(MessageType.SESSION_RESET), 1008, "protocol violation: source sent SESSION_RESET, which only the service sends"),
        ("destination", frame(MessageType.SERVICE_IDS, available_service_ids=["SSH"]), 1008, "protocol violation: destination sent SERVICE_IDS, which only the service sends"),
        ("destination", frame(MessageType.STREAM_START, stream_id=2, service_id="SSH"), 1008, "protocol violation: destination sent STREAM_START: only a source starts streams"),
        ("source", _with_unknown_field(frame(MessageType.DATA, stream_id=1, payload=b"x")), 1008, "protocol violation: DATA message has fields beyond the schema"),
        ("source", b"\x00\x02\x10\x01", 1008, "protocol violation: message has no type"),
        ("source", "text", 1003, "text frames are not allowed: tunnel data is binary"),
    ],
)
async def test_wire_rule_violation_closes_the_offender_only(
    emulator: Emulator, side: str, bad: bytes | str, code: int, reason: str
) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    offender, victim = (src, dst) if side == "source" else (dst, src)
    good = frame(MessageType.DATA, stream_id=1, payload=b"before")
    if isinstance(bad, str):
        await offender.send(good)
        await offender.send(bad)
    else:
        await offender.send(good + bad)  # the good frame in the same message still goes through
    assert await read_messages(victim, 1) == [Message(MessageType.DATA, stream_id=1, payload=b"before")]
    got_code, got_reason = await closed_with(offender)
    assert got_code == code and got_reason.startswith(reason)
    await emulator.wait_disconnected(tunnel.tunnel_id, side)
    event = await emulator.wait_event("violation", tunnel_id=tunnel.tunnel_id, side=side)
    assert event.detail["code"] == code
    assert victim.state is State.OPEN
    other_side = "destination" if side == "source" else "source"
    assert emulator.sessions(tunnel.tunnel_id, other_side) == 1
    await victim.close()


async def test_pings_and_fragmented_messages_keep_their_place_among_plain_ones(emulator: Emulator) -> None:
    """The relay's hot path takes plain masked binary messages itself; websockets still
    parses everything else, and the order on the wire is kept."""
    tunnel, src, dst = await connected_pair(emulator)
    data = [frame(MessageType.DATA, stream_id=1, payload=bytes([n]) * (n * 1000)) for n in range(1, 5)]
    await src.send(data[0])
    middle = data[1] + data[2]
    await src.send([middle[:10], middle[10:2500], middle[2500:]])  # one message in three fragments
    pong = await src.ping(b"p")
    await src.send(data[3])
    await asyncio.wait_for(pong, 10)
    got = await read_messages(dst, 4)
    assert [m.payload for m in got] == [bytes([n]) * (n * 1000) for n in range(1, 5)]
    assert emulator.sessions(tunnel.tunnel_id, "source") == 1
    await src.close()
    await dst.close()


async def test_an_unmasked_frame_from_a_client_is_refused_by_websockets(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    src.transport.write(Frame(Opcode.BINARY, frame(MessageType.DATA, stream_id=1, payload=b"x")).serialize(mask=False))
    code, _ = await closed_with(src)
    assert code == 1002  # protocol error: a client must mask
    await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    assert dst.state is State.OPEN
    await dst.close()


@pytest.mark.parametrize(
    ("second", "code"),
    [
        (Frame(Opcode.BINARY, b"x"), 1002),  # a new message inside a fragmented one
        (Frame(Opcode.CONT, bytes(MAX_WS_MESSAGE)), 1009),  # the message grows over the limit
    ],
    ids=["interleaved", "too big"],
)
async def test_a_bad_fragmented_message_fails_the_connection(emulator: Emulator, second: Frame, code: int) -> None:
    """Fragments of binary messages skip websockets' parser: the relay checks its rules."""
    tunnel, src, dst = await connected_pair(emulator)
    src.transport.write(Frame(Opcode.BINARY, b"start", fin=False).serialize(mask=True) + second.serialize(mask=True))
    got, _ = await closed_with(src)
    assert got == code
    await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    assert dst.state is State.OPEN
    await dst.close()


async def test_data_for_an_absent_peer_is_dropped(emulator: Emulator) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    src = await open_ws(emulator, "source", tunnel.source_token)
    await read_messages(src, 1)
    await emulator.wait_connected(tunnel.tunnel_id, "source")
    await src.send(frame(MessageType.DATA, stream_id=1, payload=b"lost"))
    event = await emulator.wait_event("dropped", tunnel_id=tunnel.tunnel_id, side="source")
    assert event.detail["size"] == len(frame(MessageType.DATA, stream_id=1, payload=b"lost"))
    dst = await open_ws(emulator, "destination", tunnel.destination_token)
    await read_messages(dst, 1)
    await emulator.wait_connected(tunnel.tunnel_id, "destination")
    await src.send(frame(MessageType.DATA, stream_id=1, payload=b"kept"))
    assert await read_messages(dst, 1) == [Message(MessageType.DATA, stream_id=1, payload=b"kept")]
    await src.close()
    await dst.close()


async def test_slow_reader_backpressures_the_sender(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    chunk = b"".join(frame(MessageType.DATA, stream_id=1, payload=bytes(64000)) for _ in range(2))
    sent = 0
    stalled = False
    # The destination reads nothing: buffers fill up and the source's sends must block
    # long before 256 MiB (nothing in the path may buffer without bound).
    while sent < 256 << 20:
        try:
            await asyncio.wait_for(src.send(chunk), 1.0)
        except TimeoutError:
            stalled = True
            break
        sent += len(chunk)
    assert stalled, f"sent {sent} bytes without the sender ever blocking"
    # Reading again drains everything that was accepted, intact.
    received = 0
    decoder = FrameDecoder()
    async with asyncio.timeout(30):
        while received < sent // len(chunk) * 128000:
            for message in decoder.feed(await dst.recv()):
                assert message.payload == bytes(64000)
                received += len(message.payload)
    await src.close()
    await dst.close()


async def test_bandwidth_cap_paces_the_relay(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    emulator.set_bandwidth(1_000_000)
    stream, payload = data_stream(random.Random(3), 400_000, start=False)
    started = time.monotonic()
    received, _ = await asyncio.gather(receive_payload(dst, len(payload)), send_split(src, stream, random.Random(4)))
    elapsed = time.monotonic() - started
    assert received == payload
    assert elapsed >= 0.3  # a lower bound only: 400 kB at 1 MB/s cannot take less (50 ms burst)
    emulator.set_bandwidth(None)
    await src.close()
    await dst.close()


# --- tunnel life and fault hooks ---------------------------------------------------


async def test_expiry_and_close_end_both_sessions(emulator: Emulator) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"], lifetime_minutes=1)
    _, src, dst = tunnel, *(await connected_pair_for(emulator, tunnel))
    emulator.advance_time(61)
    for ws in (src, dst):
        assert await closed_with(ws) == (1000, "tunnel closed: expired after 1 minute")
    await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    await emulator.wait_disconnected(tunnel.tunnel_id, "destination")
    assert emulator.describe(tunnel.tunnel_id)["status"] == "CLOSED"
    status, body, _ = await refused(emulator, "destination", tunnel.destination_token)
    assert (status, body) == (400, "Invalid access token: the tunnel is closed (expired after 1 minute)")

    second = emulator.open_tunnel(services=["SSH"])
    src, dst = await connected_pair_for(emulator, second)
    emulator.close_tunnel(second.tunnel_id, delete=True)
    for ws in (src, dst):
        assert await closed_with(ws) == (1000, "tunnel closed: closed by CloseTunnel")
    assert second.tunnel_id not in [t["tunnelId"] for t in emulator.list_tunnels()]


async def connected_pair_for(emu: Emulator, tunnel: Any) -> tuple[ClientConnection, ClientConnection]:
    src = await open_ws(emu, "source", tunnel.source_token)
    dst = await open_ws(emu, "destination", tunnel.destination_token)
    await read_messages(src, 1)
    await read_messages(dst, 1)
    await emu.wait_connected(tunnel.tunnel_id, "source")
    await emu.wait_connected(tunnel.tunnel_id, "destination")
    return src, dst


async def test_drop_and_injected_frames(emulator: Emulator) -> None:
    tunnel, src, dst = await connected_pair(emulator)
    await emulator.send_session_reset(tunnel.tunnel_id, "source")
    await emulator.send_stream_reset(tunnel.tunnel_id, "destination", 5, "SSH")
    await emulator.inject_raw(tunnel.tunnel_id, "destination", b"\x00\x01")
    assert await read_messages(src, 1) == [Message(MessageType.SESSION_RESET)]
    assert await dst.recv() == frame(MessageType.STREAM_RESET, stream_id=5, service_id="SSH")
    assert await dst.recv() == b"\x00\x01"

    await emulator.drop(tunnel.tunnel_id, "source")
    assert await closed_with(src) == (1001, "dropped by the emulator (fault injection)")
    assert emulator.describe(tunnel.tunnel_id)["sourceConnectionState"]["status"] == "DISCONNECTED"
    await emulator.drop(tunnel.tunnel_id, "destination", abort=True)
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await dst.recv()
    assert dst.protocol.close_rcvd is None  # cut without a close frame
    with pytest.raises(LookupError):
        await emulator.drop(tunnel.tunnel_id, "source")


async def test_tokens_never_reach_the_emulator_log(emulator: Emulator) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    emulator_logger = logging.getLogger("localproxy.emulator")
    old_level = emulator_logger.level
    emulator_logger.addHandler(handler)
    emulator_logger.setLevel(logging.DEBUG)
    try:
        tunnel = emulator.open_tunnel(services=["SSH"])
        ws = await open_ws(emulator, "source", tunnel.source_token, client_token=CLIENT_TOKEN)
        await ws.close()
        await refused(emulator, "source", tunnel.source_token, client_token=OTHER_CLIENT_TOKEN)
        await emulator.wait_disconnected(tunnel.tunnel_id, "source")
    finally:
        emulator_logger.removeHandler(handler)
        emulator_logger.setLevel(old_level)
    text = "\n".join(records)
    assert "< access-token: <redacted>" in text  # websockets' request dump went through the filter
    for secret in (tunnel.source_token, CLIENT_TOKEN, OTHER_CLIENT_TOKEN):
        assert secret not in text
