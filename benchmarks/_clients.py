"""The benchmark's clients: each connects to a port (a source proxy's or, for the
baseline, the app's) and returns what it measured. Blocking sockets for the
single-connection figures (least client overhead), asyncio for the many.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from dataclasses import dataclass, field

from _apps import CHUNK, REQUEST, chunks, expected_digest, pool

HOST = "127.0.0.1"


@dataclass
class Transfer:
    size: int
    seconds: float
    intact: bool
    error: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.intact and self.seconds > 0 else 0.0


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += part
    return bytes(data)


def upload(port: int, size: int, timeout: float, rate_kib: int = 0, stall_ms: int = 0) -> Transfer:
    """Send ``size`` bytes to the sink; it answers their sha256."""
    expected = expected_digest(size)
    start = time.perf_counter()
    try:
        with _connect(port, timeout) as sock:
            sock.sendall(REQUEST.pack(size, rate_kib, stall_ms))
            for part in chunks(size):
                sock.sendall(part)
            digest = _recv_exactly(sock, 32)
    except OSError as error:
        return Transfer(size, time.perf_counter() - start, False, f"{type(error).__name__}: {error}")
    return Transfer(size, time.perf_counter() - start, digest == expected, "" if digest == expected else "sha256 differs")


def download(port: int, size: int, timeout: float) -> Transfer:
    """Ask the source app for ``size`` bytes; check their sha256."""
    expected = expected_digest(size)
    buffer = bytearray(CHUNK * 4)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    try:
        with _connect(port, timeout) as sock:
            sock.sendall(REQUEST.pack(size, 0, 0))
            while received < size:
                count = sock.recv_into(view, min(len(buffer), size - received))
                if not count:
                    raise ConnectionError(f"closed after {received} of {size} bytes")
                digest.update(view[:count])
                received += count
    except OSError as error:
        return Transfer(size, time.perf_counter() - start, False, f"{type(error).__name__}: {error}")
    ok = digest.digest() == expected
    return Transfer(size, time.perf_counter() - start, ok, "" if ok else "sha256 differs")


def echo_latency(port: int, round_trips: int, timeout: float, size: int = 64) -> list[float]:
    """Microseconds per round trip of a ``size``-byte message on one connection."""
    message = bytes(pool()[:size])
    samples: list[float] = []
    with _connect(port, timeout) as sock:
        for index in range(round_trips + 20):  # 20 warm-up round trips
            start = time.perf_counter_ns()
            sock.sendall(message)
            if _recv_exactly(sock, size) != message:
                raise ConnectionError("echo differs")
            if index >= 20:
                samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def new_connections(port: int, count: int, timeout: float) -> tuple[list[float], int]:
    """Microseconds from connect() to the echo of one byte, one connection after another."""
    samples: list[float] = []
    failures = 0
    for _ in range(count):
        start = time.perf_counter_ns()
        try:
            with _connect(port, timeout) as sock:
                sock.sendall(b"x")
                if _recv_exactly(sock, 1) != b"x":
                    raise ConnectionError("echo differs")
                samples.append((time.perf_counter_ns() - start) / 1000)
        except OSError:
            failures += 1
    return samples, failures


@dataclass
class Concurrent:
    connections: int
    per_connection: int
    seconds: float
    succeeded: int
    first_byte_us: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.succeeded * self.per_connection / self.seconds / 1e6 if self.seconds > 0 else 0.0


def concurrent_echo(port: int, connections: int, per_connection: int, timeout: float) -> Concurrent:
    """``connections`` simultaneous connections, each echoing ``per_connection`` bytes."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        return runner.run(_concurrent(port, connections, per_connection, timeout))


async def _concurrent(port: int, connections: int, per_connection: int, timeout: float) -> Concurrent:
    payload = bytes(pool()[:per_connection])
    start_all = asyncio.Event()
    result = Concurrent(connections, per_connection, 0.0, 0)

    async def one() -> None:
        await start_all.wait()
        start = time.perf_counter_ns()
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(payload)
            received = bytearray(await reader.read(65536))
            if not received:
                raise ConnectionError("closed before the first byte")
            result.first_byte_us.append((time.perf_counter_ns() - start) / 1000)
            while len(received) < per_connection:
                part = await reader.read(65536)
                if not part:
                    raise ConnectionError(f"closed after {len(received)} bytes")
                received += part
            if bytes(received) != payload:
                raise ConnectionError("echo differs")
            result.succeeded += 1
        finally:
            writer.close()

    async def guarded() -> None:
        try:
            await one()
        except (OSError, asyncio.IncompleteReadError) as error:
            name = type(error).__name__
            result.errors[name] = result.errors.get(name, 0) + 1

    tasks = [asyncio.ensure_future(guarded()) for _ in range(connections)]
    await asyncio.sleep(0)
    began = time.perf_counter()
    start_all.set()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    result.seconds = time.perf_counter() - began
    for task in pending:
        task.cancel()
    if pending:
        result.errors["timeout"] = len(pending)
        await asyncio.wait(pending, timeout=5)
    return result
