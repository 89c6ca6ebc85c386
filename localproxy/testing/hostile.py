"""A hostile Secure Tunneling service for tests and benchmarks (issue 22): real websockets on loopback.

:class:`HostileService` accepts the proxy's websocket (plain ``ws://``, any token),
answers with the tunnel subprotocol and then does what a buggy or impersonated
service could: stop reading, flood pings, send frames for streams that never
started, announce thousands of services, close with a forged reason. Every flood
is bounded in count and time; the caller says when to stop.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from localproxy.settings import SUBPROTOCOLS
from localproxy.wire.codec import FrameDecoder, Message, MessageType, encode_frame

__all__ = ["HostileService", "Session", "ping_frames", "server_frame"]


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked websocket frame (a server's), FIN set."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return header + payload


def ping_frames(count: int, size: int = 125) -> bytes:
    """``count`` ping frames of ``size`` bytes each (125: the largest a control frame may carry)."""
    return server_frame(0x9, os.urandom(size)) * count


@dataclass
class Session:
    """One websocket the proxy opened, as the hostile service sees it."""

    ws: ServerConnection
    received: list[Message] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def transport(self) -> asyncio.Transport:
        return self.ws.transport

    def stop_reading(self) -> None:
        """Read nothing more from the proxy: its writes pile up in its buffers."""
        self.transport.pause_reading()

    def write_raw(self, data: bytes) -> None:
        """Bytes straight to the socket (websocket frames built by the caller): no drain wait."""
        if not self.transport.is_closing():
            self.transport.write(data)

    def frames_message(self, messages: Iterable[Message]) -> bytes:
        """A binary websocket frame carrying ``messages`` as tunnel frames."""
        return server_frame(0x2, b"".join(encode_frame(message) for message in messages))

    async def send(self, *messages: Message) -> None:
        await self.ws.send(b"".join(encode_frame(message) for message in messages))

    async def flood(self, message: bytes, *, seconds: float, max_count: int, backlog: int = 1 << 20) -> int:
        """Write ``message`` (raw bytes) again and again for up to ``seconds`` or ``max_count``
        times, keeping at most ``backlog`` bytes in our own write buffer; returns the count."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        sent = 0
        while sent < max_count and loop.time() < end and not self.transport.is_closing():
            if self.transport.get_write_buffer_size() > backlog:
                await asyncio.sleep(0.005)  # pacing our own output, not waiting for a state
                continue
            self.write_raw(message)
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)
        return sent


class HostileService:
    """``async with HostileService(service_ids) as svc``: ``svc.url``, ``await svc.next_session()``."""

    def __init__(self, service_ids: Iterable[str] | None = ("SSH",)) -> None:
        self.service_ids = None if service_ids is None else tuple(service_ids)
        self.sessions: list[Session] = []
        self._new: asyncio.Queue[Session] = asyncio.Queue()
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "HostileService":
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol(p) for p in SUBPROTOCOLS],
            compression=None,
            ping_interval=None,
            max_size=None,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for session in self.sessions:
            session.transport.abort()
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), 10)

    async def next_session(self, timeout: float = 10.0) -> Session:
        return await asyncio.wait_for(self._new.get(), timeout)

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(ws)
        self.sessions.append(session)
        if self.service_ids is not None:
            await session.send(Message(MessageType.SERVICE_IDS, available_service_ids=self.service_ids))
        self._new.put_nowait(session)
        decoder = FrameDecoder()
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    session.received += [_copy(m) for m in decoder.feed(data)]
        except Exception:  # noqa: BLE001 - the proxy aborted: that is what the tests provoke
            pass
        finally:
            session.closed.set()


def _copy(message: Message) -> Message:
    payload: Any = message.payload
    message.payload = bytes(payload)
    return message
