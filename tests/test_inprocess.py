"""In-process connections: ``LocalProxy.open_connection`` / ``connect_socket`` and ``InProcess()``.

Real parts: the emulator on loopback, a destination LocalProxy in front of a real
TCP app (an asyncssh server, an echo server), a source LocalProxy whose
connections come from the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncssh
import pytest

from localproxy import (
    ConnectionRejected,
    DestinationTarget,
    InProcess,
    Listening,
    LocalProxy,
    Mode,
    ProxyConfig,
    ServiceEndpoint,
    SourcePort,
    TunnelNotReadyError,
    UnknownServiceError,
    UsageError,
)
from localproxy.local.adapters import WRITE_HIGH
from localproxy.settings import Settings
from localproxy.testing.processes import echo

TIMEOUT = 15.0
FAST = Settings(retry_delay_ms=50, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=50)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def app_server(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def proxies(
    emulator: Any, apps: dict[str, int], source_targets: dict[str, Any], settings: Settings = FAST
) -> AsyncIterator[tuple[LocalProxy, LocalProxy]]:
    """A destination in front of ``apps`` and a source serving ``source_targets``, both ready."""
    tunnel = emulator.open_tunnel(services=list(apps))
    endpoint = ServiceEndpoint.parse(emulator.data_url)
    destination = LocalProxy(
        ProxyConfig(
            Mode.DESTINATION, tunnel.destination_token, endpoint,
            services={name: DestinationTarget("127.0.0.1", port) for name, port in apps.items()}, settings=settings,
        )
    )  # fmt: skip
    source = LocalProxy(
        ProxyConfig(Mode.SOURCE, tunnel.source_token, endpoint, services=source_targets, settings=settings,
                    bind_address="127.0.0.1")
    )  # fmt: skip
    async with destination, source:
        await asyncio.wait_for(asyncio.gather(destination.ready, source.ready), TIMEOUT)
        await emulator.wait_connected(tunnel.tunnel_id, "destination", TIMEOUT)
        yield source, destination


# --- an SSH client and server over in-process connections --------------------------------


class _OpenServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: the test is about the transport


async def _run_command(process: asyncssh.SSHServerProcess[str]) -> None:
    process.stdout.write(f"ran: {process.command}\n")
    process.exit(0)


@contextlib.asynccontextmanager
async def ssh_server() -> AsyncIterator[int]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        _OpenServer, "127.0.0.1", 0, server_host_keys=[key], process_factory=_run_command
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_asyncssh_client_over_connect_socket(tunneling_service: Any) -> None:
    async with ssh_server() as ssh_port, proxies(tunneling_service, {"SSH": ssh_port}, {"SSH": InProcess()}) as (
        source,
        _,
    ):
        assert source.ports == {}  # InProcess: no listener

        async def session(n: int) -> str:
            sock = source.connect_socket("SSH")  # on the loop's thread: returns at once
            async with asyncssh.connect("device", sock=sock, username="test", known_hosts=None) as conn:
                result = await conn.run(f"echo {n}", check=True)
            return str(result.stdout)

        outputs = await asyncio.wait_for(asyncio.gather(*(session(n) for n in range(3))), TIMEOUT)
        assert outputs == [f"ran: echo {n}\n" for n in range(3)]


async def test_asyncssh_client_over_open_connection_streams(tunneling_service: Any) -> None:
    """asyncssh through a tunnel object whose connections are ``open_connection`` streams."""
    async with ssh_server() as ssh_port, proxies(tunneling_service, {"SSH": ssh_port}, {"SSH": InProcess()}) as (
        source,
        _,
    ):
        loop = asyncio.get_running_loop()

        class ViaProxy:
            """asyncssh's ``tunnel=``: relays an in-process connection through a local socket pair."""

            async def create_connection(self, factory: Any, host: str, port: int) -> Any:
                reader, writer = await source.open_connection("SSH")
                mine, theirs = socket.socketpair()

                async def pump() -> None:
                    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)

                    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                        while data := await src.read(65536):
                            dst.write(data)
                            await dst.drain()
                        dst.close()

                    await asyncio.gather(copy(reader, peer_writer), copy(peer_reader, writer), return_exceptions=True)

                pumps.append(loop.create_task(pump()))
                return await loop.create_connection(factory, sock=mine)

        pumps: list[asyncio.Task[None]] = []
        async with asyncssh.connect("device", tunnel=ViaProxy(), username="test", known_hosts=None) as conn:
            result = await asyncio.wait_for(conn.run("uname", check=True), TIMEOUT)
        assert result.stdout == "ran: uname\n"
        await asyncio.wait_for(asyncio.gather(*pumps), TIMEOUT)


# --- streams: several at once, EOF each way, backpressure -----------------------------------


async def test_simultaneous_connections_keep_their_bytes(tunneling_service: Any) -> None:
    async with app_server(echo) as port, proxies(tunneling_service, {"ECHO": port}, {"ECHO": InProcess()}) as (
        source,
        _,
    ):

        payloads = [bytes([n]) * 300_000 + os.urandom(1000) for n in range(8)]

        async def one(payload: bytes) -> bytes:
            reader, writer = await source.open_connection("ECHO")
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            writer.close()
            await writer.wait_closed()
            return got

        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in payloads)), TIMEOUT)
        assert results == payloads


async def test_open_connection_on_a_service_that_has_a_listener(tunneling_service: Any) -> None:
    async with app_server(echo) as port, proxies(tunneling_service, {"ECHO": port}, {"ECHO": SourcePort(0)}) as (
        source,
        _,
    ):
        assert set(source.ports) == {"ECHO"}
        tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", source.ports["ECHO"])
        reader, writer = await source.open_connection()  # the only service
        for w in (writer, tcp_writer):
            w.write(b"both ways")
        assert await asyncio.wait_for(reader.readexactly(9), TIMEOUT) == b"both ways"
        assert await asyncio.wait_for(tcp_reader.readexactly(9), TIMEOUT) == b"both ways"
        for w in (writer, tcp_writer):
            w.close()


async def test_client_eof_closes_the_far_end(tunneling_service: Any) -> None:
    app_saw_eof = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b"last words"  # read() returns at EOF
        app_saw_eof.set()
        writer.close()

    async with app_server(app) as port, proxies(tunneling_service, {"APP": port}, {"APP": InProcess()}) as (source, _):
        reader, writer = await source.open_connection("APP")
        writer.write(b"last words")
        await writer.drain()
        writer.write_eof()  # no half-close in the tunnel protocol: the connection ends
        await asyncio.wait_for(app_saw_eof.wait(), TIMEOUT)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()


async def test_far_end_close_flushes_then_eof(tunneling_service: Any) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 500_000 + b"bye")
        await writer.drain()
        writer.close()

    async with app_server(app) as port, proxies(tunneling_service, {"APP": port}, {"APP": InProcess()}) as (source, _):
        reader, writer = await source.open_connection("APP")
        data = await asyncio.wait_for(reader.read(), TIMEOUT)  # everything, then EOF
        assert len(data) == 500_003 and data.endswith(b"bye")
        writer.close()


async def test_a_reader_that_does_not_read_stops_the_sender(tunneling_service: Any) -> None:
    """Backpressure: the app's writes block; the proxy holds a bounded amount; all arrives later."""
    written = 0
    blocked = asyncio.Event()
    chunk = b"z" * 65536

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        for _ in range(1024):  # at most 64 MiB
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except asyncio.TimeoutError:
                blocked.set()
                await writer.drain()  # resumes once the client reads
            written += len(chunk)
            if blocked.is_set() and written >= 4 * 1024 * 1024:
                break
        writer.close()

    # A small receive budget; no stalled-reader reset while the test holds still.
    settings = Settings(
        retry_delay_ms=50, receive_budget_bytes=2 * 1024 * 1024, stalled_reader_timeout_ms=120_000
    )
    async with app_server(app) as port, proxies(
        tunneling_service, {"APP": port}, {"APP": InProcess()}, settings
    ) as (source, _):
        reader, writer = await source.open_connection("APP")
        await asyncio.wait_for(blocked.wait(), TIMEOUT)
        held_at_block = written
        # What the source proxy buffers for this connection stays within its receive
        # budget (plus one websocket message): it stopped reading the tunnel.
        conns = list(source._engine._conns.values())
        assert len(conns) == 1 and WRITE_HIGH < conns[0].buffered() <= settings.receive_budget_bytes + 2 * 65536
        assert not source._engine.writers_drained.is_set()
        assert held_at_block < 32 * 1024 * 1024  # the sender stopped long before 64 MiB
        total = 0
        while data := await asyncio.wait_for(reader.read(1 << 20), TIMEOUT):
            total += len(data)
        assert total == written and total >= 4 * 1024 * 1024
        writer.close()


# --- typed errors and the InProcess target ----------------------------------------------------


async def test_typed_errors(tunneling_service: Any) -> None:
    async with app_server(echo) as port, proxies(tunneling_service, {"ECHO": port}, {"ECHO": InProcess()}) as (
        source,
        destination,
    ):
        with pytest.raises(UsageError, match="source-mode"):
            await destination.open_connection("ECHO")
        with pytest.raises(UsageError, match="source-mode"):
            destination.connect_socket("ECHO")
        with pytest.raises(UnknownServiceError, match="'WEB'.*'ECHO'"):
            await source.open_connection("WEB")
        with pytest.raises(UnknownServiceError):
            await asyncio.to_thread(source.connect_socket, "WEB")
    with pytest.raises(TunnelNotReadyError, match="closed"):
        await source.open_connection("ECHO")
    unstarted = LocalProxy(source.config)
    with pytest.raises(TunnelNotReadyError, match="not started"):
        await unstarted.open_connection("ECHO")
    with pytest.raises(TunnelNotReadyError, match="not started"):
        unstarted.connect_socket("ECHO")


async def test_not_ready_before_the_services_are_known(tunneling_service: Any) -> None:
    tunnel = tunneling_service.open_tunnel(services=["SSH"])
    # Nothing listens on this port: the proxy keeps retrying and never gets ready.
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = ServiceEndpoint("127.0.0.1", spare.getsockname()[1], tls=False)
        config = ProxyConfig(Mode.SOURCE, tunnel.source_token, dead, services={"SSH": InProcess()}, settings=FAST)
        async with LocalProxy(config) as proxy:
            with pytest.raises(TunnelNotReadyError, match="not ready"):
                await proxy.open_connection("SSH")


async def test_connect_socket_from_another_thread(tunneling_service: Any) -> None:
    events: list[object] = []
    async with app_server(echo) as port, proxies(tunneling_service, {"ECHO": port}, {"ECHO": InProcess()}) as (
        source,
        _,
    ):
        source.subscribe(events.append)

        def blocking_client() -> bytes:
            with source.connect_socket("ECHO", timeout=TIMEOUT) as sock:
                sock.settimeout(TIMEOUT)
                sock.sendall(b"from a thread")
                received = b""
                while len(received) < 13:
                    data = sock.recv(100)
                    if not data:
                        break
                    received += data
                return received

        assert await asyncio.to_thread(blocking_client) == b"from a thread"
    assert not [e for e in events if isinstance(e, Listening)]


async def test_a_far_end_that_does_not_read_stops_the_in_process_writer(tunneling_service: Any) -> None:
    """Backpressure the other way: the caller's drain() blocks; nothing grows without bound."""
    app_reading = asyncio.Event()
    received = 0

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await app_reading.wait()  # does not read until told
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 20):
                received += len(data)
        writer.close()

    async with app_server(app) as port, proxies(tunneling_service, {"APP": port}, {"APP": InProcess()}) as (source, _):
        reader, writer = await source.open_connection("APP")
        chunk = b"u" * 65536
        written = 0
        for _ in range(1024):  # at most 64 MiB
            writer.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except asyncio.TimeoutError:
                break
        else:
            pytest.fail("64 MiB went into a tunnel whose far end does not read")
        assert written < 48 * 1024 * 1024
        app_reading.set()
        await asyncio.wait_for(writer.drain(), TIMEOUT)  # flows again once the app reads
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        assert 0 < received <= written


async def test_in_process_connections_count_as_local_connections(tunneling_service: Any) -> None:
    """The same engine path as a TCP client: counted in stats, bound by max_active_connections."""
    rejected: list[object] = []
    settings = Settings(retry_delay_ms=50, tcp_max_active_connections=2)
    async with app_server(echo) as port, proxies(
        tunneling_service, {"ECHO": port}, {"ECHO": InProcess()}, settings
    ) as (source, _):
        source.subscribe(lambda event: rejected.append(event) if isinstance(event, ConnectionRejected) else None)
        pairs = [await source.open_connection("ECHO") for _ in range(2)]
        for reader, writer in pairs:
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"x"
        assert source.stats().active_connections.get("ECHO") == 2
        reader, writer = await source.open_connection("ECHO")  # one over the limit: closed at once
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        assert len(rejected) == 1
        for _, w in pairs + [(reader, writer)]:
            w.close()


async def test_attach_socket_serves_a_socket_the_caller_accepted(tunneling_service: Any) -> None:
    async with app_server(echo) as port, proxies(tunneling_service, {"ECHO": port}, {"ECHO": InProcess()}) as (
        source,
        _,
    ):
        mine, theirs = socket.socketpair()
        await source.attach_socket(mine, "ECHO")
        reader, writer = await asyncio.open_connection(sock=theirs)
        writer.write(b"handed over")
        assert await asyncio.wait_for(reader.readexactly(11), TIMEOUT) == b"handed over"
        writer.close()
        spare, other = socket.socketpair()
        with pytest.raises(UnknownServiceError):
            await source.attach_socket(spare, "WEB")
        assert spare.fileno() == -1  # closed on error
        other.close()
