"""Fuzzing with hypothesis: random and mutated tunnel frames injected into a live
session (random command lines: ``test_reliability_cli_fuzz.py``).

Frames are injected whole (the 2-byte length always matches the body), as one
websocket message of 1-3 frames, through the emulator's ``inject_raw``: that is what
a broken or hostile service could send without desynchronising the framing itself.
After every example, whatever the bytes were:

- nothing but typed errors: no traceback logged by localproxy, and a proxy that stops
  does so with a ``LocalProxyError`` (then the rig starts a fresh pair and goes on);
- the long-lived connection, probed through the tunnel, gets its probe back intact or
  is closed (EOF/reset); other bytes only if the frames held DATA for its stream;
- a new connection completes an intact round trip in bounded time (after a session
  restart when the frames broke the protocol: ``reconnect_on_data_error``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from contextlib import AsyncExitStack
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from localproxy.emulator import Emulator
from localproxy.errors import LocalProxyError, ProtocolError
from localproxy.events import (
    Connected,
    ConnectionStarted,
    Disconnected,
    ErrorEvent,
    StreamStarted,
    TunnelReady,
)
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.types import Mode, SourcePort
from localproxy.wire.codec import FrameDecoder, Message, MessageType, encode_frame

TIMEOUT = 10.0
FUZZ_SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class TracebackCollector(logging.Handler):
    """Collects localproxy log records that carry a traceback (a bug, never a clean rejection)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.CRITICAL:
            self.records.append(record)


class SessionRig:
    """Emulator + echo app + a pair of proxies, kept alive across hypothesis examples
    in one event loop (driven by ``self.run``)."""

    def __init__(self, rel_kit: Any) -> None:
        self.kit = rel_kit
        self.runner = asyncio.Runner()
        self.stack = AsyncExitStack()
        self.pair_stack: AsyncExitStack | None = None
        self.emulator: Emulator | None = None
        self.pair: Any = None
        self.app: Any = None
        self.changed: asyncio.Event | None = None
        self.long_lived: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.long_lived_ids = (0, 0)  # (stream id, connection id) of the long-lived connection
        self.count = 0
        self.collector = TracebackCollector()

    def run(self, coroutine: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coroutine, 60))

    async def start(self) -> None:
        self.changed = asyncio.Event()
        self.emulator = await self.stack.enter_async_context(Emulator())
        self.app = await self.kit.App("echo").start()
        await self.new_pair()

    async def new_pair(self) -> None:
        if self.pair_stack is not None:
            await self.pair_stack.aclose()
        self.long_lived = None
        self.pair_stack = AsyncExitStack()
        emulator = self.emulator
        assert emulator is not None
        tunnel = emulator.open_tunnel(services=["SSH"])
        dst = LocalProxy(self.kit.config(Mode.DESTINATION, tunnel.destination_token, emulator,
                                         {"SSH": self.app.target()}))
        src = LocalProxy(self.kit.config(Mode.SOURCE, tunnel.source_token, emulator, {"SSH": SourcePort(0)}))
        self.pair = self.kit.Pair(emulator, tunnel, src, dst)
        for proxy, events in ((src, self.pair.src_events), (dst, self.pair.dst_events)):
            proxy.subscribe(lambda event, events=events: (events.append(event), self._wake()))
            await self.pair_stack.enter_async_context(proxy)
        # Done when that proxy stopped (wait_closed is public; the result is checked in ensure_serving).
        self.stopped = [asyncio.ensure_future(proxy.wait_closed()) for proxy in (src, dst)]
        for task in self.stopped:
            task.add_done_callback(lambda _: self._wake())
        self.pair_stack.callback(lambda tasks=self.stopped: [task.cancel() for task in tasks])
        await asyncio.wait_for(asyncio.gather(dst.ready, src.ready), TIMEOUT)
        await self.pair.wait_serving()

    def _wake(self) -> None:
        assert self.changed is not None
        self.changed.set()

    async def stop(self) -> None:
        if self.pair_stack is not None:
            await self.pair_stack.aclose()
        if self.app is not None:
            await self.app.close()
        await self.stack.aclose()

    def close(self) -> None:
        try:
            self.run(self.stop())
        finally:
            self.runner.close()

    # --- one example ----------------------------------------------------------

    async def ensure_serving(self) -> None:
        """A proxy that stopped must have stopped with a typed error; then use a fresh pair."""
        stopped = [task for task in self.stopped if task.done()]
        for task in stopped:
            error = task.exception()
            # a clean, typed rejection (e.g. SERVICE_IDS naming other services)
            assert isinstance(error, LocalProxyError), f"a proxy stopped with {error!r} after injected frames"
        if stopped:
            await self.new_pair()
        await self.pair.wait_serving()

    async def open_long_lived(self) -> None:
        events = self.pair.src_events
        mark = len(events)
        reader, writer = await self.pair.connect()
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"hello"
        started = [e for e in events[mark:] if isinstance(e, (StreamStarted, ConnectionStarted))]
        assert started, "no stream or connection started for the long-lived connection"
        last = started[-1]
        self.long_lived_ids = (last.stream_id, getattr(last, "connection_id", 1))
        self.long_lived = (reader, writer)

    def close_long_lived(self) -> None:
        if self.long_lived is not None:
            self.long_lived[1].close()
            self.long_lived = None

    async def inject(self, side: str, data: bytes) -> bool:
        """False when that side had no session to inject into (it is reconnecting)."""
        try:
            await self.pair.emulator.inject_raw(self.pair.tunnel.tunnel_id, side, data)
        except LookupError:
            return False
        return True

    async def source_barrier(self, may_receive_injected: bool) -> bool:
        """After the fuzz frames, a marker DATA for the long-lived connection goes to the source:
        True once it came out of that connection, False if the connection was closed."""
        assert self.long_lived is not None
        reader, _ = self.long_lived
        self.count += 1
        marker = b"<marker %d>" % self.count
        stream_id, connection_id = self.long_lived_ids
        frame = encode_frame(Message(MessageType.DATA, stream_id=stream_id, service_id="SSH",
                                     connection_id=connection_id, payload=marker))
        await self.inject("source", frame)
        got = bytearray()
        while not got.endswith(marker):
            try:
                chunk = await asyncio.wait_for(reader.read(4096), TIMEOUT)
            except ConnectionError:
                chunk = b""
            if not chunk:
                assert may_receive_injected or marker.startswith(bytes(got)), f"got {bytes(got)!r} before EOF"
                self.close_long_lived()
                return False
            got += chunk
        assert may_receive_injected or bytes(got) == marker, f"long-lived connection got {bytes(got)!r}"
        return True

    async def probe_long_lived(self) -> None:
        """The long-lived connection still echoes intact, both ways through the tunnel."""
        assert self.long_lived is not None
        reader, writer = self.long_lived
        self.count += 1
        probe = b"probe %d" % self.count
        writer.write(probe)
        assert await asyncio.wait_for(reader.readexactly(len(probe)), TIMEOUT) == probe

    async def destination_barrier(self, app_connections: int, dst_mark: int) -> None:
        """After the fuzz frames, a marker STREAM_START goes to the destination: it is processed
        (the app gets a connection) unless the frames broke the session (an ErrorEvent)."""
        self.count += 1
        frame = encode_frame(Message(MessageType.STREAM_START, stream_id=100000 + self.count, service_id="SSH",
                                     connection_id=1))
        if not await self.inject("destination", frame):
            return
        assert self.changed is not None
        app = self.app

        async def either() -> None:
            while len(app.conns) <= app_connections:
                if any(isinstance(e, ErrorEvent) for e in self.pair.dst_events[dst_mark:]):
                    return
                app.progress.clear()
                self.changed.clear()
                waiters = [asyncio.ensure_future(app.progress.wait()), asyncio.ensure_future(self.changed.wait())]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()

        await asyncio.wait_for(either(), TIMEOUT)

    async def settle(self, src_mark: int, dst_mark: int) -> None:
        """A proxy whose session ended since the marks has reconnected, or stopped."""
        for index, (events, mark) in enumerate(((self.pair.src_events, src_mark), (self.pair.dst_events, dst_mark))):
            ended = [i for i in range(mark, len(events)) if isinstance(events[i], (ErrorEvent, Disconnected))]
            if ended:
                await self.resolution(index, events, ended[-1])

    async def resolution(self, index: int, events: list[Any], start: int) -> None:
        """Until proxy ``index`` is connected again after event ``start``, or has stopped."""
        assert self.changed is not None
        stopped = self.stopped[index]
        side = ("source", "destination")[index]

        async def wait() -> None:
            while not stopped.done():
                connected = [i for i in range(start, len(events)) if isinstance(events[i], Connected)]
                if connected and any(isinstance(e, TunnelReady) for e in events[connected[-1]:]):
                    await self.pair.emulator.wait_connected(self.pair.tunnel.tunnel_id, side)
                    return
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), TIMEOUT)

    async def fresh_roundtrip(self) -> None:
        """A new connection round trip completes intact. An attempt may fail loudly (closed,
        refused) only while a session is ending; then retry once it is resolved."""
        for attempt in range(4):
            await self.ensure_serving()
            pair = self.pair
            marks = (len(pair.src_events), len(pair.dst_events))
            self.count += 1
            data = b"fresh round trip %d" % self.count
            try:
                reader, writer = await pair.connect()
                try:
                    writer.write(data)
                    assert await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT) == data
                    return
                finally:
                    writer.close()
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                failure = error
            ended = await self.wait_session_end(pair, marks)
            assert ended, f"a new connection failed ({failure!r}) while the sessions were up"
        raise AssertionError("no new connection completed after the injected frames")

    async def wait_session_end(self, pair: Any, marks: tuple[int, int]) -> bool:
        """After a failed attempt: wait for the session end that explains it, and its resolution."""
        assert self.changed is not None
        lists = (pair.src_events, pair.dst_events)

        async def wait() -> tuple[int, int]:
            while True:
                for index, events in enumerate(lists):
                    for i in range(marks[index], len(events)):
                        if isinstance(events[i], (ErrorEvent, Disconnected)):
                            return index, i
                    if self.stopped[index].done():
                        return index, len(events)
                self.changed.clear()
                await self.changed.wait()

        try:
            index, start = await asyncio.wait_for(wait(), TIMEOUT)
        except TimeoutError:
            return False
        await self.resolution(index, lists[index], start)
        return True


def decoded_or_error(data: bytes) -> list[Message] | None:
    """What the proxy's decoder makes of one injected message (None: a ProtocolError)."""
    try:
        return FrameDecoder().feed(data)
    except ProtocolError:
        return None


def touches_stream(messages: list[Message] | None, stream_id: int | None) -> bool:
    return bool(messages) and any(m.stream_id == stream_id for m in messages)  # type: ignore[union-attr]


# --- frame strategies ---------------------------------------------------------------------

STREAM_IDS = st.one_of(st.sampled_from([0, 1, 2, 3, 1000]), st.integers(-(2**31), 2**31 - 1))
SERVICE_IDS = st.one_of(st.sampled_from(["", "SSH", "OTHER"]), st.text(max_size=8))


@st.composite
def structured_frames(draw: Any) -> bytes:
    message = Message(
        type=draw(st.one_of(st.sampled_from(list(MessageType)), st.integers(0, 20))),
        stream_id=draw(STREAM_IDS),
        ignorable=draw(st.booleans()),
        payload=draw(st.binary(max_size=300)),
        service_id=draw(SERVICE_IDS),
        available_service_ids=tuple(draw(st.lists(SERVICE_IDS, max_size=3))),
        connection_id=draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 2**32 - 1))),
    )
    try:
        return encode_frame(message)
    except (ProtocolError, UnicodeEncodeError):  # not encodable: send its fields raw instead
        return frame_of(struct.pack(">BiB", 0x10, message.stream_id & 0x7FFFFFFF, 0))


def frame_of(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


RANDOM_BODIES = st.binary(min_size=0, max_size=400).map(frame_of)


@st.composite
def mutated_frames(draw: Any) -> bytes:
    base = encode_frame(draw(st.sampled_from([
        Message(MessageType.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"payload bytes"),
        Message(MessageType.STREAM_RESET, stream_id=5, service_id="SSH"),
        Message(MessageType.CONNECTION_START, stream_id=9, service_id="SSH", connection_id=2),
        Message(MessageType.SERVICE_IDS, available_service_ids=("SSH",)),
        Message(MessageType.DATA, stream_id=77, connection_id=3, payload=bytes(range(256))),
    ])))
    body = bytearray(base[2:])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(body) - 1)))
        if kind == "flip" and body:
            body[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            body[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and body:
            del body[position]
        elif kind == "truncate":
            del body[position:]
    return frame_of(bytes(body))


INJECTIONS = st.lists(st.one_of(structured_frames(), RANDOM_BODIES, mutated_frames()), min_size=1, max_size=3).map(
    b"".join)


@pytest.fixture
def session_rig(rel_kit: Any) -> Iterator[SessionRig]:
    rig = SessionRig(rel_kit)
    logging.getLogger("localproxy").addHandler(rig.collector)
    try:
        rig.run(rig.start())
        yield rig
    finally:
        logging.getLogger("localproxy").removeHandler(rig.collector)
        rig.close()


def _frame(kind: MessageType, **fields: Any) -> bytes:
    return encode_frame(Message(kind, **fields))


@FUZZ_SETTINGS
@given(data=INJECTIONS, side=st.sampled_from(["source", "source", "destination"]))
@example(data=_frame(MessageType.SERVICE_IDS, available_service_ids=("OTHER",)), side="source")  # fatal, typed
@example(data=_frame(MessageType.SERVICE_IDS, available_service_ids=("SSH",)), side="destination")
@example(data=_frame(MessageType.STREAM_START, stream_id=42, service_id="SSH", connection_id=1), side="source")
@example(data=_frame(MessageType.SESSION_RESET), side="source")
@example(data=_frame(MessageType.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"in"), side="source")
@example(data=_frame(MessageType.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=7),
         side="destination")
@example(data=_frame(99, ignorable=True), side="source")
@example(data=_frame(99, stream_id=1), side="destination")
@example(data=b"\x00\x00", side="source")
def test_injected_frames_only_typed_errors_and_the_tunnel_keeps_serving(session_rig: SessionRig, data: bytes,
                                                                        side: str) -> None:
    rig = session_rig

    async def example() -> None:
        await rig.ensure_serving()
        if rig.long_lived is None:
            await rig.open_long_lived()
        src_mark, dst_mark = len(rig.pair.src_events), len(rig.pair.dst_events)
        app_connections = len(rig.app.conns)
        injected = await rig.inject(side, data)
        if side == "source":
            touched = touches_stream(decoded_or_error(data), rig.long_lived_ids[0])
            if await rig.source_barrier(may_receive_injected=touched) and not touched:
                await rig.probe_long_lived()
        else:
            # Frames reaching only the destination may end its side of the stream without the
            # source hearing of it (the one-sided reset of test_reliability_faults): start afresh.
            rig.close_long_lived()
            if injected:
                await rig.destination_barrier(app_connections, dst_mark)
        await rig.settle(src_mark, dst_mark)
        await rig.fresh_roundtrip()

    rig.run(example())
    assert not rig.collector.records, [r.getMessage() for r in rig.collector.records]
