"""Benchmark applications and clients: the bytes the tunnel benchmark moves.

The destination apps run in their own process (``python benchmarks/_apps.py``
prints one JSON line ``{"echo": PORT, "sink": PORT, "source": PORT}``) so that
their CPU does not count against the benchmark's clients. Each is an
``asyncio.Protocol`` on uvloop: no task per chunk.

Wire conventions (all on one TCP connection):

- ``echo``: every byte comes back.
- ``sink``: the client sends a 16-byte request ``!QII`` = (size, rate KiB/s, stall ms),
  then ``size`` bytes; the app reads them (after ``stall`` ms, at most ``rate``
  KiB/s when non-zero: the slow reader) and answers the 32-byte sha256 of them.
- ``source``: the client sends the same request; the app sends ``size`` bytes of
  :func:`chunks` (the client knows their sha256 in advance).
- ``count``: reads everything, answers the running total (8 bytes) after each 64 KiB.

The payload is cut from an 8 MiB seeded random pool at offsets that do not
repeat with any short period, so reordered or duplicated chunks change the hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import struct
import sys
from collections.abc import Iterator

REQUEST = struct.Struct("!QII")
CHUNK = 256 * 1024
_POOL_SIZE = 8 * 1024 * 1024
_POOL_SEED = 20240601
_pool: memoryview | None = None


def pool() -> memoryview:
    global _pool
    if _pool is None:
        _pool = memoryview(random.Random(_POOL_SEED).randbytes(_POOL_SIZE))
    return _pool


def chunks(size: int, chunk: int = CHUNK) -> Iterator[memoryview]:
    """``size`` bytes of payload as memoryview slices of the pool (no copies)."""
    data = pool()
    index = 0
    sent = 0
    while sent < size:
        length = min(chunk, size - sent)
        offset = (index * 1_000_003) % (_POOL_SIZE - chunk)
        yield data[offset : offset + length]
        sent += length
        index += 1


def expected_digest(size: int) -> bytes:
    digest = hashlib.sha256()
    for part in chunks(size):
        digest.update(part)
    return digest.digest()


# --- the apps (server side) ------------------------------------------------------


class EchoApp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class SinkApp(asyncio.Protocol):
    """Reads ``size`` bytes (optionally slowly), answers their sha256."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.head = b""
        self.remaining = -1
        self.rate = 0
        self.digest = hashlib.sha256()
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self.remaining < 0:
            self.head += data
            if len(self.head) < REQUEST.size:
                return
            size, rate_kib, stall_ms = REQUEST.unpack_from(self.head)
            data, self.head = self.head[REQUEST.size :], b""
            self.remaining, self.rate = size, rate_kib * 1024
            if stall_ms:
                self._pause_for(stall_ms / 1000)
        if not data:
            return
        take = data[: self.remaining]
        self.digest.update(take)
        self.remaining -= len(take)
        if self.remaining == 0:
            self.transport.write(self.digest.digest())
            self.remaining = -1
            self.digest = hashlib.sha256()
        elif self.rate:
            self._pause_for(len(data) / self.rate)

    def _pause_for(self, seconds: float) -> None:
        self.transport.pause_reading()
        self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()


class CountApp(asyncio.Protocol):
    """Reads everything; after each 64 KiB answers the total so far (8 bytes, big-endian):
    a sender learns how much really arrived, whatever the buffers in between hold."""

    STEP = 64 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.total = 0
        self.next_report = self.STEP

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        if self.total >= self.next_report:
            self.next_report = self.total + self.STEP
            self.transport.write(self.total.to_bytes(8, "big"))


class SourceApp(asyncio.Protocol):
    """Sends ``size`` bytes of :func:`chunks`, driven by the transport's flow control."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.head = b""
        self.parts: Iterator[memoryview] | None = None
        self.paused = False

    def data_received(self, data: bytes) -> None:
        if self.parts is not None:
            return
        self.head += data
        if len(self.head) >= REQUEST.size:
            size, _, _ = REQUEST.unpack_from(self.head)
            self.parts = chunks(size)
            self._pump()

    def _pump(self) -> None:
        assert self.parts is not None
        while not self.paused:
            part = next(self.parts, None)
            if part is None:
                return
            self.transport.write(part)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve_apps(host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    ports: dict[str, int] = {}
    servers = []
    for name, factory in (("echo", EchoApp), ("sink", SinkApp), ("source", SourceApp), ("count", CountApp)):
        server = await loop.create_server(factory, host, 0, backlog=4096)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    pool()
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    # Runs until stdin closes (the benchmark ends or dies): never outlives its parent.
    await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve_apps())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_apps())


if __name__ == "__main__":
    main()
