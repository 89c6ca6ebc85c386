"""What the proxy puts on the websocket during a bulk transfer, seen by a real websocket
server standing in for the service: messages of at most 131076 bytes, each made of
whole tunnel frames (no frame split across messages, so no receiver has to reassemble
one), and the DATA payloads in order are exactly the bytes the application sent.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from websockets.asyncio.server import serve

from localproxy.ops.runtime import tune_allocator
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import V3
from localproxy.types import Mode, SourcePort
from localproxy.wire.codec import (
    MAX_WS_MESSAGE,
    FrameDecoder,
    Message,
    MessageType,
    encode_frame,
)

TIMEOUT = 10.0
SIZE = 3 * 1024 * 1024 + 12345


class RecordingService:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.received = 0
        self.progress = asyncio.Event()

    async def handler(self, ws: Any) -> None:
        await ws.send(encode_frame(Message(MessageType.SERVICE_IDS, available_service_ids=("SSH",))))
        async for message in ws:
            self.messages.append(message)
            self.received += len(message)
            self.progress.set()

    async def wait_payload(self, size: int) -> list[Message]:
        """Until the DATA payloads add up to ``size``; returns every decoded message."""

        decoder = FrameDecoder()  # across messages: frames may legally span them
        decoded: list[Message] = []
        fed = 0

        async def check() -> list[Message]:
            nonlocal fed
            while True:
                for message in self.messages[fed:]:
                    decoded.extend(decoder.feed(message))
                fed = len(self.messages)
                if sum(len(m.payload) for m in decoded if m.type == MessageType.DATA) >= size:
                    return decoded
                self.progress.clear()
                await self.progress.wait()

        return await asyncio.wait_for(check(), TIMEOUT)


async def test_bulk_messages_hold_whole_frames_in_order(rel_kit: Any) -> None:
    service = RecordingService()
    async with serve(service.handler, "127.0.0.1", 0, subprotocols=[V3], max_size=MAX_WS_MESSAGE) as server:
        endpoint = type("Endpoint", (), {"data_url": f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"})()
        config = rel_kit.config(Mode.SOURCE, "token", endpoint, {"SSH": SourcePort(0)})
        blob = os.urandom(SIZE)
        async with LocalProxy(config) as proxy:
            await asyncio.wait_for(proxy.ready, TIMEOUT)
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.ports["SSH"]),
                                                    TIMEOUT)
            writer.write(blob)
            decoded = await service.wait_payload(SIZE)
            writer.close()
    for message in service.messages:
        assert len(message) <= MAX_WS_MESSAGE
        decoder = FrameDecoder()
        decoder.feed(message)
        assert decoder.pending == 0, "a websocket message ends in the middle of a tunnel frame"
    kinds = [m.type for m in decoded]
    assert kinds[0] == MessageType.STREAM_START
    payload = b"".join(bytes(m.payload) for m in decoded if m.type == MessageType.DATA)
    assert payload == blob


def test_allocator_tuning_applies_on_glibc() -> None:
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_allocator() is expected
