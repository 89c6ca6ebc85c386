"""The websocket receive path: WebsocketSplitter (sans-I/O), the decoder's in-place ranges,
and TunnelConnection against a raw server that sends frames in the handshake's own segment."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side

from localproxy.websocket.connection import TunnelConnection
from localproxy.wire.codec import FrameDecoder, encode_data_frame
from localproxy.wire.ws_frames import WebsocketSplitter

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIMEOUT = 10.0
MAX = 1 << 20


def ws_frame(opcode: Opcode, data: bytes, fin: bool = True, mask: bool = False) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=mask)


def feed_in_pieces(splitter: WebsocketSplitter, stream: bytes, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    previous = 0
    for cut in sorted(min(cut, len(stream)) for cut in cuts) + [len(stream)]:
        out += splitter.feed(stream[previous:cut])
        previous = cut
    return [_kind(item) for item in out]


def _kind(item: Any) -> tuple[str, Any]:
    if isinstance(item, tuple):
        return ("msg", bytes(item[0][item[1] : item[2]]))
    if isinstance(item, Frame):
        return ("frag", (item.opcode, bytes(item.data), item.fin))
    return ("raw", item)


def frame_strategy(mask: bool) -> Any:
    """One frame (or fragmented message) of the stream: (bytes on the wire, what the splitter returns)."""

    def wire(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
        return ws_frame(opcode, data, fin, mask=mask)

    def raw(data: bytes) -> tuple[bytes, list[tuple[str, Any]]]:
        return data, [("raw", data)]

    def fragmented(parts: tuple[bytes, bytes]) -> tuple[bytes, list[tuple[str, Any]]]:
        first, last = wire(Opcode.BINARY, parts[0], fin=False), wire(Opcode.CONT, parts[1])
        if not mask:  # a client's splitter: websockets assembles it
            return raw(first + last)
        # a server's: the fragments, unmasked, for websockets' assembler
        return first + last, [("frag", (Opcode.BINARY, parts[0], False)), ("frag", (Opcode.CONT, parts[1], True))]

    return st.one_of(
        st.binary(max_size=70_000).map(lambda data: (wire(Opcode.BINARY, data), [("msg", data)])),
        st.sampled_from([0, 125, 126, 65535, 65536]).map(lambda size: (wire(Opcode.BINARY, bytes(size)), [("msg", bytes(size))])),
        st.binary(max_size=125).map(lambda data: raw(wire(Opcode.PING, data))),
        st.binary(max_size=125).map(lambda data: raw(wire(Opcode.PONG, data))),
        st.text(max_size=20).map(lambda text: raw(wire(Opcode.TEXT, text.encode()))),
        st.tuples(st.binary(max_size=300), st.binary(max_size=300)).map(fragmented),
        # A fragmented text message: websockets' (UTF-8), however it is masked.
        st.tuples(st.text(max_size=30), st.text(max_size=30)).map(
            lambda parts: raw(wire(Opcode.TEXT, parts[0].encode(), fin=False) + wire(Opcode.CONT, parts[1].encode()))
        ),
        # The other masking than the side expects: websockets must see it (and refuse it).
        st.binary(max_size=300).map(lambda data: raw(ws_frame(Opcode.BINARY, data, mask=not mask))),
    )


@pytest.mark.parametrize("masked", [False, True], ids=["from a server", "from a client (masked)"])
@PROPERTY
@given(data=st.data(), cuts=st.lists(st.integers(0, 300_000), max_size=6))
def test_split_returns_plain_messages_in_place_and_everything_else_whole(
    masked: bool, data: st.DataObject, cuts: list[int]
) -> None:
    stream_frames: list[tuple[bytes, list[tuple[str, Any]]]] = data.draw(st.lists(frame_strategy(masked), max_size=8))
    stream = b"".join(wire for wire, _ in stream_frames)
    splitter = WebsocketSplitter(MAX, masked=masked)
    got = feed_in_pieces(splitter, stream, cuts)
    expected = [item for _, items in stream_frames for item in items]
    # Raw frames come one by one; join consecutive raw items on both sides to compare.
    assert _join_raw(got) == _join_raw(expected)
    assert splitter.pending == 0 and not splitter.passthrough and splitter.failure is None


def _join_raw(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    joined: list[tuple[str, Any]] = []
    for kind, data in items:
        if kind == "raw" and joined and joined[-1][0] == "raw":
            joined[-1] = ("raw", joined[-1][1] + data)
        else:
            joined.append((kind, data))
    return joined


def test_each_raw_frame_is_whole() -> None:
    stream = ws_frame(Opcode.PING, b"p1") + ws_frame(Opcode.BINARY, b"x") + ws_frame(Opcode.PONG, b"p2")
    got = feed_in_pieces(WebsocketSplitter(MAX), stream, [1, 3, 5])
    assert got == [("raw", ws_frame(Opcode.PING, b"p1")), ("msg", b"x"), ("raw", ws_frame(Opcode.PONG, b"p2"))]


def test_a_message_inside_one_chunk_is_not_copied() -> None:
    chunk = ws_frame(Opcode.BINARY, b"a" * 300) + ws_frame(Opcode.BINARY, b"b" * 70_000)
    items = WebsocketSplitter(MAX).feed(chunk)
    assert [item[0] is chunk for item in items] == [True, True]


def test_after_a_close_frame_everything_goes_to_websockets() -> None:
    close = ws_frame(Opcode.CLOSE, Close(1000, "bye").serialize())
    after = ws_frame(Opcode.BINARY, b"late")
    splitter = WebsocketSplitter(MAX)
    got = feed_in_pieces(splitter, close + after, [len(close) - 1])
    assert _join_raw(got) == [("raw", close + after)]
    assert splitter.passthrough


@pytest.mark.parametrize("cut", [0, 1, 3, 6, 11])
def test_an_oversized_frame_goes_to_websockets_from_its_header(cut: int) -> None:
    before = ws_frame(Opcode.BINARY, b"ok")
    big = ws_frame(Opcode.BINARY, bytes(200))
    splitter = WebsocketSplitter(100)
    got = feed_in_pieces(splitter, before + big, [len(before) + cut])
    assert got[0] == ("msg", b"ok")
    assert _join_raw(got[1:]) == [("raw", big)]
    assert splitter.passthrough


def test_a_masked_message_comes_back_unmasked_in_a_copy_of_its_own() -> None:
    payload = os.urandom(1000)
    chunk = ws_frame(Opcode.BINARY, payload, mask=True)
    [(buffer, start, stop)] = WebsocketSplitter(MAX, masked=True).feed(chunk)
    assert (buffer, start, stop) == (payload, 0, len(payload)) and buffer is not chunk


def test_a_data_frame_inside_a_fragmented_message_fails_and_stops_the_split() -> None:
    first = ws_frame(Opcode.BINARY, b"a" * 10, fin=False, mask=True)
    intruder = ws_frame(Opcode.BINARY, b"b", mask=True)
    after = ws_frame(Opcode.BINARY, b"c", mask=True)
    splitter = WebsocketSplitter(MAX, masked=True)
    got = feed_in_pieces(splitter, first + intruder + after, [len(first) + 1])
    assert got == [("frag", (Opcode.BINARY, b"a" * 10, False))]  # nothing after the intruder
    assert splitter.failure == (1002, "expected a continuation frame") and splitter.passthrough


@pytest.mark.parametrize("cut", [0, 3])
def test_fragments_over_the_size_limit_fail_with_1009(cut: int) -> None:
    first = ws_frame(Opcode.BINARY, bytes(60), fin=False, mask=True)
    second = ws_frame(Opcode.CONT, bytes(60), mask=True)
    splitter = WebsocketSplitter(100, masked=True)
    got = feed_in_pieces(splitter, first + second, [len(first) + cut])
    assert got == [("frag", (Opcode.BINARY, bytes(60), False))]
    assert splitter.failure == (1009, "message over 100 bytes")


def test_masked_and_reserved_bit_frames_go_to_websockets() -> None:
    masked = ws_frame(Opcode.BINARY, b"masked", mask=True)
    rsv = bytes([0x82 | 0x40, 3]) + b"rsv"
    got = feed_in_pieces(WebsocketSplitter(MAX), masked + rsv, [])
    assert got == [("raw", masked), ("raw", rsv)]


@PROPERTY
@given(st.binary(max_size=50), st.binary(max_size=50), st.lists(st.binary(max_size=3000), min_size=1, max_size=4))
def test_decoder_reads_a_range_in_place_like_the_bytes_alone(before: bytes, after: bytes, payloads: list[bytes]) -> None:
    stream = b"".join(b"".join(encode_data_frame(7, 1, payload, "SSH")) for payload in payloads)
    buffer = before + stream + after
    in_place = FrameDecoder().feed(buffer, len(before), len(before) + len(stream))
    assert in_place == FrameDecoder().feed(stream)
    assert [bytes(message.payload) for message in in_place] == payloads


def test_decoder_range_keeps_a_partial_frame_across_ranges() -> None:
    stream = b"".join(encode_data_frame(3, 1, b"z" * 500, "SSH"))
    decoder = FrameDecoder()
    junk = b"\xff" * 5
    assert decoder.feed(junk + stream[:7] + junk, 5, 12) == []
    (message,) = decoder.feed(junk + stream[7:] + junk, 5, 5 + len(stream) - 7)
    assert bytes(message.payload) == b"z" * 500


# --- TunnelConnection against a raw server --------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.lost = asyncio.Event()
        self.arrived = asyncio.Event()

    def received(self, buffer: bytes, start: int, stop: int) -> None:
        self.items.append(bytes(buffer[start:stop]))
        self.arrived.set()

    def received_text(self) -> None:
        self.items.append("text")
        self.arrived.set()

    def connection_lost(self) -> None:
        self.lost.set()


async def _raw_server(after_handshake: bytes, seen: list[Opcode]) -> tuple[asyncio.Server, int]:
    """A websocket server in 20 lines: the 101 and ``after_handshake`` go out in one write."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + after_handshake)  # fmt: skip
        parser = Protocol(Side.SERVER)
        try:
            for _ in range(100):  # what the client sends (a pong, its close), until its close
                data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
                if not data:
                    break
                parser.receive_data(data)
                seen.extend(event.opcode for event in parser.events_received() if isinstance(event, Frame))
                if Opcode.CLOSE in seen:
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_frames_sent_with_the_handshake_reach_the_receiver_in_order() -> None:
    big = os.urandom(200_000)
    after = (
        ws_frame(Opcode.BINARY, b"first")
        + ws_frame(Opcode.PING, b"are you there")
        + ws_frame(Opcode.BINARY, b"frag-", fin=False)
        + ws_frame(Opcode.CONT, b"mented")
        + ws_frame(Opcode.TEXT, b"hello")
        + ws_frame(Opcode.BINARY, big)
        + ws_frame(Opcode.CLOSE, Close(1000, "done").serialize())
        + ws_frame(Opcode.BINARY, b"after close: dropped")
    )
    seen: list[Opcode] = []
    server, port = await _raw_server(after, seen)
    collector = Collector()
    async with server:
        ws = await asyncio.wait_for(
            connect(f"ws://127.0.0.1:{port}/", create_connection=TunnelConnection, ping_interval=None,
                    max_size=MAX, compression=None), TIMEOUT)  # fmt: skip
        assert isinstance(ws, TunnelConnection)
        ws.attach(collector)
        await asyncio.wait_for(collector.lost.wait(), TIMEOUT)
    assert collector.items == [b"first", b"frag-mented", "text", big]
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.reason == "done"
    assert seen == [Opcode.PONG, Opcode.CLOSE]  # websockets answered the ping and the close
