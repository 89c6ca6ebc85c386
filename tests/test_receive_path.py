"""The receive path: a service may fragment a websocket message anywhere, even inside
a tunnel frame's header; the proxy must deliver the payloads intact (issue 13)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from localproxy.events import ConnectionStarted
from localproxy.wire.codec import encode_data_frame


async def test_fragmented_message_split_mid_frame_arrives_intact(emulator: Any, rel_kit: Any,
                                                                 rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    try:
        pair = await rel_pair_factory(emulator, {"SSH": app})
        reader, writer = await pair.connect()
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), rel_kit.TIMEOUT) == b"hello"
        started = [event for event in pair.src_events if isinstance(event, ConnectionStarted)]
        stream_id, connection_id = started[-1].stream_id, started[-1].connection_id

        payloads = [os.urandom(size) for size in (1, 1000, 60_000, 3)]
        stream = b"".join(b"".join(encode_data_frame(stream_id, connection_id, payload, service_id="SSH"))
                          for payload in payloads)
        # Cuts inside the first frame's length prefix and header, and inside a payload.
        cuts = [0, 1, 2, 4, 5000, 61_000, len(stream)]
        fragments = [stream[start:end] for start, end in zip(cuts, cuts[1:])]
        # websockets sends an iterable as one fragmented message (one frame per item).
        await emulator.inject_raw(pair.tunnel.tunnel_id, "source", fragments)
        expected = b"".join(payloads)
        assert await asyncio.wait_for(reader.readexactly(len(expected)), rel_kit.TIMEOUT) == expected

        writer.write(b"still there")  # the session went on: the connection still echoes
        assert await asyncio.wait_for(reader.readexactly(11), rel_kit.TIMEOUT) == b"still there"
        writer.close()
    finally:
        await app.close()
