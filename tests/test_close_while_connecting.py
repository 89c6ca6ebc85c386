"""A client that writes and leaves at once loses nothing when the destination's
connect to its app is still in progress (the bytes are delivered, then the
connection is closed), whether the client is in-process or TCP.

Deterministic: the destination app is a Unix socket that does not exist yet, so
the destination's first connect fails; the source's client has written and
closed by then; the app appears and the retry must deliver the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from localproxy import (
    DestinationTarget,
    InProcess,
    LocalProxy,
    Mode,
    ProxyConfig,
    ServiceEndpoint,
    SourcePort,
)
from localproxy.settings import Settings

TIMEOUT = 15.0
SETTINGS = Settings(retry_delay_ms=50, tcp_connection_retry_count=20, tcp_connection_retry_delay_ms=100)


class LineWatch(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.loop.call_soon_threadsafe(self.seen.set)


@pytest.mark.parametrize("client", ["in-process", "tcp"])
async def test_bytes_sent_before_the_app_accepts_are_delivered(
    tunneling_service: Any, tmp_path: Path, client: str
) -> None:
    path = str(tmp_path / "app.sock")
    tunnel = tunneling_service.open_tunnel(services=["APP"])
    endpoint = ServiceEndpoint.parse(tunneling_service.data_url)
    destination = LocalProxy(ProxyConfig(
        Mode.DESTINATION, tunnel.destination_token, endpoint,
        services={"APP": DestinationTarget(unix_path=path)}, settings=SETTINGS,
    ))  # fmt: skip
    target = InProcess() if client == "in-process" else SourcePort(0)
    source = LocalProxy(ProxyConfig(
        Mode.SOURCE, tunnel.source_token, endpoint, services={"APP": target}, settings=SETTINGS,
        bind_address="127.0.0.1",
    ))  # fmt: skip
    watch = LineWatch("Could not connect to")
    logging.getLogger("localproxy.adapters").addHandler(watch)
    received = asyncio.get_running_loop().create_future()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())  # everything, then EOF
        writer.close()

    try:
        async with destination, source:
            await asyncio.wait_for(asyncio.gather(destination.ready, source.ready), TIMEOUT)
            if client == "in-process":
                reader, writer = await source.open_connection("APP")
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", source.ports["APP"])
            writer.write(b"last words")
            await writer.drain()
            writer.close()  # gone before the destination could reach its app
            await asyncio.wait_for(watch.seen.wait(), TIMEOUT)  # the first connect failed
            server = await asyncio.start_unix_server(app, path)
            try:
                assert await asyncio.wait_for(received, TIMEOUT) == b"last words"
            finally:
                server.close()
    finally:
        logging.getLogger("localproxy.adapters").removeHandler(watch)
