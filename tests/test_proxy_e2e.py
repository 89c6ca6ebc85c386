"""LocalProxy end to end: real sockets on loopback, the in-process Emulator, real apps."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import resource
import socket
import tempfile
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from localproxy.config.proxy_config import ProxyConfig
from localproxy.emulator import Emulator
from localproxy.errors import (
    ConfigError,
    ConnectionFailedError,
    ExitCode,
    HandshakeRejectedError,
    ProtocolError,
    TunnelClosedError,
)
from localproxy.events import (
    Connected,
    ConnectionRejected,
    Disconnected,
    ErrorEvent,
    Listening,
    StreamReset,
    StreamStarted,
    TunnelReady,
)
from localproxy.local import adapters
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.serve import run_proxy
from localproxy.settings import V1, V2, V3, Settings
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort

TIMEOUT = 10
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def proxy_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        retry_delay_ms=50, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=50
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def proxy_emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator:
        yield emulator


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes = b"") -> None:
    try:
        if tag:
            writer.write(tag)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class App:
    """A destination application: a TCP (or Unix) server running ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.handler(reader, writer)

    async def start(self, unix_path: str | None = None) -> "App":
        if unix_path:
            self.server = await asyncio.start_unix_server(self._handle, unix_path, backlog=1024)
        else:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    def target(self) -> DestinationTarget:
        return DestinationTarget(host="127.0.0.1", port=self.port)

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def config(mode: Mode, token: str, emulator: Emulator, services: dict, **kw: Any) -> ProxyConfig:
    kw.setdefault("settings", proxy_settings())
    if mode is Mode.SOURCE:
        kw.setdefault("bind_address", "127.0.0.1")
    return ProxyConfig(
        mode=mode,
        access_token=token,
        endpoint=ServiceEndpoint.parse(emulator.data_url),
        services=services,
        **kw,
    )


async def start_pair(
    stack: AsyncExitStack,
    emulator: Emulator,
    destinations: dict[str, DestinationTarget],
    *,
    source_services: dict | None = None,
    tunnel_services: list[str] | None = None,
    source_kw: dict | None = None,
    destination_kw: dict | None = None,
) -> tuple[Any, LocalProxy, LocalProxy]:
    tunnel = emulator.open_tunnel(
        services=tunnel_services if tunnel_services is not None else list(destinations)
    )
    dst = await stack.enter_async_context(
        LocalProxy(
            config(
                Mode.DESTINATION, tunnel.destination_token, emulator, destinations, **(destination_kw or {})
            )
        )
    )
    src_services = (
        source_services if source_services is not None else {s: SourcePort(0) for s in destinations}
    )
    src = await stack.enter_async_context(
        LocalProxy(config(Mode.SOURCE, tunnel.source_token, emulator, src_services, **(source_kw or {})))
    )
    await asyncio.wait_for(asyncio.gather(dst.ready, src.ready), TIMEOUT)
    await emulator.wait_connected(tunnel.tunnel_id, "destination")
    return tunnel, src, dst


async def open_port(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)


async def roundtrip(port: int, data: bytes, expect_prefix: bytes = b"") -> bytes:
    reader, writer = await open_port(port)
    writer.write(data)
    got = await asyncio.wait_for(reader.readexactly(len(expect_prefix) + len(data)), TIMEOUT)
    writer.close()
    return got


async def wait_for_event(events: list, predicate: Callable[[Any], bool], start: int = 0) -> Any:
    """Events are appended by subscribers; wait (bounded) until one matches."""
    for _ in range(1000):
        for event in events[start:]:
            if predicate(event):
                return event
        await asyncio.sleep(0.01)
    raise AssertionError(f"no matching event in {events[start:]}")


# --- data integrity and multiplexing ------------------------------------------------


async def test_integrity_several_mib_each_way(proxy_emulator: Emulator) -> None:
    to_destination = os.urandom(6 * 1024 * 1024 + 12345)
    to_source = os.urandom(5 * 1024 * 1024 + 777)
    received_at_destination: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            writer.write(to_source)
            await writer.drain()

        sending = asyncio.create_task(send())
        data = await reader.readexactly(len(to_destination))
        received_at_destination.set_result(hashlib.sha256(data).hexdigest())
        await sending
        await reader.read()  # until the source app closes
        writer.close()

    server = await App(app).start()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(stack, proxy_emulator, {"SSH": server.target()})
        reader, writer = await open_port(src.ports["SSH"])
        writer.write(to_destination)
        got = await asyncio.wait_for(reader.readexactly(len(to_source)), 30)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(to_source).hexdigest()
        digest = await asyncio.wait_for(received_at_destination, 30)
        assert digest == hashlib.sha256(to_destination).hexdigest()
        writer.close()
    server.close()


async def test_three_services_multiplexed_at_once(proxy_emulator: Emulator) -> None:
    names = ["SSH", "WEB", "RDP"]
    apps = [await App(functools.partial(echo, tag=name.encode() + b":")).start() for name in names]
    async with AsyncExitStack() as stack:
        _, src, dst = await start_pair(stack, proxy_emulator, {n: a.target() for n, a in zip(names, apps)})
        assert set(src.ports) == set(names) and len(set(src.ports.values())) == 3
        payloads = {name: os.urandom(300_000) for name in names}
        results = await asyncio.gather(
            *(
                roundtrip(src.ports[name], payloads[name], expect_prefix=name.encode() + b":")
                for name in names
            )
        )
        for name, result in zip(names, results):
            assert result == name.encode() + b":" + payloads[name]
        assert src.subprotocol == V3 and dst.subprotocol == V3
    for app in apps:
        app.close()


async def test_twenty_simultaneous_connections_on_one_service(proxy_emulator: Emulator) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(stack, proxy_emulator, {"SSH": app.target()})
        port = src.ports["SSH"]
        streams = await asyncio.gather(*(open_port(port) for _ in range(20)))
        payloads = [os.urandom(random.randint(1, 200_000)) for _ in streams]
        for (_, writer), payload in zip(streams, payloads):
            writer.write(payload)
        got = await asyncio.wait_for(
            asyncio.gather(*(reader.readexactly(len(p)) for (reader, _), p in zip(streams, payloads))),
            TIMEOUT,
        )
        assert got == payloads
        assert app.connections == 20
        for _, writer in streams:
            writer.close()
    app.close()


BURST = 1000


async def test_burst_of_connections_is_held_by_the_backlog(proxy_emulator: Emulator) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 5 * BURST:  # four sockets per tunnelled connection live in this process
        if hard != resource.RLIM_INFINITY and hard < 5 * BURST:
            pytest.skip(f"needs {5 * BURST} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (5 * BURST, hard))
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(
            stack,
            proxy_emulator,
            {"SSH": app.target()},
            source_kw={"settings": proxy_settings(tcp_max_active_connections=1000)},
            destination_kw={"settings": proxy_settings(tcp_max_active_connections=1000)},
        )
        port = src.ports["SSH"]
        # Non-blocking connects first connects first (a burst the event loop has not accepted yet).
        socks = []
        for _ in range(BURST):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            socks.append(sock)
        streams = await asyncio.gather(*(asyncio.open_connection(sock=sock) for sock in socks))
        for index, (_, writer) in enumerate(streams):
            writer.write(b"%05d" % index)
        got = await asyncio.wait_for(asyncio.gather(*(reader.readexactly(5) for reader, _ in streams)), 20)
        assert got == [b"%05d" % index for index in range(BURST)]
        for _, writer in streams:
            writer.close()
    app.close()


async def test_unix_socket_destination(proxy_emulator: Emulator) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "app.sock")
        app = await App(echo).start(unix_path=path)
        async with AsyncExitStack() as stack:
            _, src, _ = await start_pair(stack, proxy_emulator, {"SSH": DestinationTarget(unix_path=path)})
            payload = os.urandom(500_000)
            assert await roundtrip(src.ports["SSH"], payload) == payload
        app.close()


async def test_tls_tunnel_with_capath() -> None:
    app = await App(echo).start()
    async with Emulator(tls=True) as emulator, AsyncExitStack() as stack:
        assert emulator.data_url.startswith("wss://") and emulator.capath
        _, src, _ = await start_pair(
            stack,
            emulator,
            {"SSH": app.target()},
            source_kw={"capath": emulator.capath},
            destination_kw={"capath": emulator.capath},
        )
        payload = os.urandom(1024 * 1024)
        assert await roundtrip(src.ports["SSH"], payload) == payload
    app.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_listener_and_destination(proxy_emulator: Emulator) -> None:
    app_server = await asyncio.start_server(echo, "::1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(
            stack,
            proxy_emulator,
            {"SSH": DestinationTarget(host="::1", port=app_port)},
            source_kw={"bind_address": "::1"},
        )
        reader, writer = await asyncio.wait_for(asyncio.open_connection("::1", src.ports["SSH"]), TIMEOUT)
        writer.write(b"over six")
        assert await asyncio.wait_for(reader.readexactly(8), TIMEOUT) == b"over six"
        writer.close()
    app_server.close()


async def test_listen_on_localhost_binds_every_address_with_one_port() -> None:
    accepted: list[str] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport.get_extra_info("sockname")[0])
            transport.close()

    servers, port = await adapters.listen("SVC", "localhost", 0, Probe)
    try:
        addresses = {
            str(info[4][0]) for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
        }
        for address in addresses:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), TIMEOUT)
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
        assert sorted(accepted) == sorted(addresses)
    finally:
        for server in servers:
            server.close()


async def test_two_tunnels_in_one_event_loop(proxy_emulator: Emulator) -> None:
    apps = [await App(functools.partial(echo, tag=tag)).start() for tag in (b"one:", b"two:")]
    async with AsyncExitStack() as stack:
        first = await start_pair(stack, proxy_emulator, {"SSH": apps[0].target()})
        second = await start_pair(stack, proxy_emulator, {"SSH": apps[1].target()})
        results = await asyncio.gather(
            roundtrip(first[1].ports["SSH"], b"a" * 100_000, expect_prefix=b"one:"),
            roundtrip(second[1].ports["SSH"], b"b" * 100_000, expect_prefix=b"two:"),
        )
        assert results == [b"one:" + b"a" * 100_000, b"two:" + b"b" * 100_000]
    for app in apps:
        app.close()


# --- closing, failures, limits ---------------------------------------------------------


async def test_destination_down_closes_the_source_connection(proxy_emulator: Emulator) -> None:
    with socket.socket() as placeholder:  # a port with nobody listening
        placeholder.bind(("127.0.0.1", 0))
        dead = DestinationTarget(host="127.0.0.1", port=placeholder.getsockname()[1])
    async with AsyncExitStack() as stack:
        _, src, dst = await start_pair(stack, proxy_emulator, {"SSH": dead})
        events: list = []
        dst.subscribe(events.append)
        reader, writer = await open_port(src.ports["SSH"])
        writer.write(b"anyone?")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed, nothing received
        assert any(isinstance(e, ConnectionRejected) for e in events)
        writer.close()


async def test_eof_flushes_data_both_ways(proxy_emulator: Emulator) -> None:
    blob = os.urandom(2 * 1024 * 1024)
    got_at_destination: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(5)
        if header == b"WRITE":  # send a blob then close at once: nothing may be lost
            writer.write(blob)
            writer.close()
        else:  # read until the source closes
            got_at_destination.set_result(await reader.read())
            writer.close()

    server = await App(app).start()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(stack, proxy_emulator, {"SSH": server.target()})
        reader, writer = await open_port(src.ports["SSH"])
        writer.write(b"WRITE")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == blob  # all of it, then EOF
        writer.close()
        reader, writer = await open_port(src.ports["SSH"])
        writer.write(b"READ!" + blob)
        writer.close()  # closing right after writing: the bytes still arrive, then EOF
        assert await asyncio.wait_for(got_at_destination, TIMEOUT) == blob
    server.close()


async def test_max_active_connections_closes_the_extra_one(proxy_emulator: Emulator) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(
            stack,
            proxy_emulator,
            {"SSH": app.target()},
            source_kw={"settings": proxy_settings(tcp_max_active_connections=2)},
        )
        port = src.ports["SSH"]
        kept = [await open_port(port) for _ in range(2)]
        for reader, writer in kept:  # both really work
            writer.write(b"ok")
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"ok"
        reader, writer = await open_port(port)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        kept[0][1].close()
        await asyncio.wait_for(kept[0][1].wait_closed(), TIMEOUT)
        for _ in range(100):  # once the source saw the close, a new one is accepted again
            reader, writer = await open_port(port)
            writer.write(b"again")
            data = await asyncio.wait_for(reader.read(5), TIMEOUT)
            writer.close()
            if data:
                assert data == b"again"
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("no connection accepted after one closed")
    app.close()


async def test_destination_connect_is_retried(proxy_emulator: Emulator) -> None:
    loop = asyncio.get_running_loop()
    refused_once = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Could not connect" in record.getMessage():
                loop.call_soon_threadsafe(refused_once.set)

    watch = Watch()
    logging.getLogger("localproxy.adapters").addHandler(watch)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening yet: connects are refused
    port = sock.getsockname()[1]
    try:
        async with AsyncExitStack() as stack:
            _, src, _ = await start_pair(
                stack,
                proxy_emulator,
                {"SSH": DestinationTarget(host="127.0.0.1", port=port)},
                destination_kw={
                    "settings": proxy_settings(
                        tcp_connection_retry_count=3, tcp_connection_retry_delay_ms=300
                    )
                },
            )
            reader, writer = await open_port(src.ports["SSH"])
            writer.write(b"patience")
            await asyncio.wait_for(refused_once.wait(), TIMEOUT)
            app = await asyncio.start_server(echo, sock=sock)  # the service comes up
            assert await asyncio.wait_for(reader.readexactly(8), TIMEOUT) == b"patience"
            writer.close()
            app.close()
    finally:
        logging.getLogger("localproxy.adapters").removeHandler(watch)
        sock.close()


# --- sessions: reconnects, resets, rejections ---------------------------------------------


async def test_reconnect_after_the_emulator_drops_the_session(proxy_emulator: Emulator) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        tunnel, src, dst = await start_pair(stack, proxy_emulator, {"SSH": app.target()})
        port = src.ports["SSH"]
        events: list = []
        src.subscribe(events.append)
        reader, writer = await open_port(port)
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), TIMEOUT) == b"before"
        for side in ("source", "destination"):
            await proxy_emulator.drop(tunnel.tunnel_id, side)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the stream died with it
        await wait_for_event(events, lambda e: isinstance(e, Disconnected))
        await wait_for_event(events, lambda e: isinstance(e, TunnelReady))
        await proxy_emulator.wait_connected(tunnel.tunnel_id, "destination")
        await proxy_emulator.wait_connected(tunnel.tunnel_id, "source")
        assert src.ports["SSH"] == port  # same port after the reconnect
        assert await roundtrip(port, b"after") == b"after"
        assert proxy_emulator.handshake_count(tunnel.tunnel_id, "source") == 2
    app.close()


async def test_session_reset_closes_connections_and_new_ones_work(proxy_emulator: Emulator) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        tunnel, src, _ = await start_pair(stack, proxy_emulator, {"SSH": app.target()})
        reader, writer = await open_port(src.ports["SSH"])
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"x"
        await proxy_emulator.send_session_reset(tunnel.tunnel_id, "source")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        assert await roundtrip(src.ports["SSH"], b"fresh") == b"fresh"
    app.close()


async def test_garbage_from_the_service_restarts_the_session(proxy_emulator: Emulator) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        tunnel, src, _ = await start_pair(stack, proxy_emulator, {"SSH": app.target()})
        events: list = []
        src.subscribe(events.append)
        await proxy_emulator.inject_raw(tunnel.tunnel_id, "source", b"\x00\x03\xff\xff\xff")
        error = await wait_for_event(events, lambda e: isinstance(e, ErrorEvent))
        assert isinstance(error.error, ProtocolError) and not error.fatal
        await wait_for_event(events, lambda e: isinstance(e, Connected))
        await wait_for_event(events, lambda e: isinstance(e, TunnelReady))
        assert await roundtrip(src.ports["SSH"], b"still works") == b"still works"
    app.close()


async def test_garbage_is_fatal_without_reconnect_on_data_error(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    cfg = config(
        Mode.SOURCE,
        tunnel.source_token,
        proxy_emulator,
        {"SSH": SourcePort(0)},
        settings=proxy_settings(reconnect_on_data_error=False),
    )
    async with LocalProxy(cfg) as src:
        await asyncio.wait_for(src.ready, TIMEOUT)
        await proxy_emulator.inject_raw(
            tunnel.tunnel_id, "source", b"\x00\x02\x08\x09"
        )  # type 9, not ignorable
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(src.wait_closed(), TIMEOUT)


async def test_service_unavailable_is_retried(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    proxy_emulator.fail_next_handshakes(3, status=503)
    events: list = []
    cfg = config(Mode.SOURCE, tunnel.source_token, proxy_emulator, {"SSH": SourcePort(0)})
    async with LocalProxy(cfg) as src:
        src.subscribe(events.append)
        await asyncio.wait_for(src.ready, TIMEOUT)
    retried = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(retried) == 3 and not any(e.fatal for e in retried)


async def test_retries_exhausted_is_connection_failed(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    proxy_emulator.fail_next_handshakes(5, status=502)
    cfg = config(
        Mode.SOURCE,
        tunnel.source_token,
        proxy_emulator,
        {"SSH": SourcePort(0)},
        settings=proxy_settings(connect_retry_count=2),
    )
    async with LocalProxy(cfg) as src:
        with pytest.raises(ConnectionFailedError):
            await asyncio.wait_for(src.ready, TIMEOUT)
        with pytest.raises(ConnectionFailedError):
            await src.wait_closed()


async def test_rejected_token_is_fatal_and_run_proxy_returns_its_exit_code(proxy_emulator: Emulator) -> None:
    proxy_emulator.open_tunnel(services=["SSH"])
    cfg = config(Mode.SOURCE, "not-a-valid-token", proxy_emulator, {"SSH": SourcePort(0)})
    async with LocalProxy(cfg) as src:
        with pytest.raises(HandshakeRejectedError) as caught:
            await asyncio.wait_for(src.wait_closed(), TIMEOUT)
    code = await asyncio.wait_for(run_proxy(cfg), TIMEOUT)
    assert code == caught.value.exit_code and code not in (0, 1)


async def test_closed_tunnel_ends_the_proxy_with_an_error(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    cfg = config(Mode.SOURCE, tunnel.source_token, proxy_emulator, {"SSH": SourcePort(0)})
    async with LocalProxy(cfg) as src:
        await asyncio.wait_for(src.ready, TIMEOUT)
        proxy_emulator.close_tunnel(tunnel.tunnel_id)
        with pytest.raises(TunnelClosedError) as caught:
            await asyncio.wait_for(src.wait_closed(), TIMEOUT)
        assert caught.value.exit_code == ExitCode.TUNNEL_CLOSED
        assert "open-tunnel" in str(caught.value)
        assert src.ports == {}  # listeners closed


async def test_service_mismatch_is_a_config_error(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    cfg = config(
        Mode.DESTINATION,
        tunnel.destination_token,
        proxy_emulator,
        {"WEB": DestinationTarget(host="127.0.0.1", port=1)},
    )
    assert await asyncio.wait_for(run_proxy(cfg), TIMEOUT) == ConfigError.exit_code


async def test_listen_port_in_use_is_a_config_error(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = config(
            Mode.SOURCE, tunnel.source_token, proxy_emulator, {"SSH": SourcePort(busy.getsockname()[1])}
        )
        async with LocalProxy(cfg) as src:
            with pytest.raises(ConfigError, match="Cannot listen"):
                await asyncio.wait_for(src.ready, TIMEOUT)


# --- protocol versions -------------------------------------------------------------------


@pytest.mark.parametrize("client_type,destination_subprotocol", [("V2", V2), ("V1", V1), ("V2", V3)])
async def test_older_destination_with_destination_client_type(
    proxy_emulator: Emulator, client_type: str, destination_subprotocol: str
) -> None:
    app = await App(echo).start()
    async with AsyncExitStack() as stack:
        _, src, dst = await start_pair(
            stack,
            proxy_emulator,
            {"SSH": app.target()},
            source_kw={"destination_client_type": client_type},
            destination_kw={"settings": proxy_settings(subprotocol=destination_subprotocol)},
        )
        assert src.subprotocol == V3 and dst.subprotocol == destination_subprotocol
        port = src.ports["SSH"]
        payload = os.urandom(200_000)
        assert await roundtrip(port, payload) == payload
        # One connection per stream: a second one waits until the first ends.
        first_reader, first_writer = await open_port(port)
        first_writer.write(b"one")
        assert await asyncio.wait_for(first_reader.readexactly(3), TIMEOUT) == b"one"
        second_reader, second_writer = await open_port(port)
        second_writer.write(b"two")
        first_writer.write(b"more")
        assert await asyncio.wait_for(first_reader.readexactly(4), TIMEOUT) == b"more"
        first_writer.close()
        assert await asyncio.wait_for(second_reader.readexactly(3), TIMEOUT) == b"two"
        second_writer.close()
    app.close()


async def test_events_and_listening_log(proxy_emulator: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="localproxy")
    app = await App(echo).start()
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    events: list = []
    dst_cfg = config(Mode.DESTINATION, tunnel.destination_token, proxy_emulator, {"SSH": app.target()})
    src_cfg = config(Mode.SOURCE, tunnel.source_token, proxy_emulator, {"SSH": SourcePort(0)})
    async with LocalProxy(dst_cfg) as dst, LocalProxy(src_cfg) as src:
        src.subscribe(events.append)
        await asyncio.wait_for(asyncio.gather(src.ready, dst.ready), TIMEOUT)
        port = src.ports["SSH"]
        assert await roundtrip(port, b"hi") == b"hi"
        await wait_for_event(events, lambda e: isinstance(e, StreamReset))
    kinds = [type(e) for e in events]
    assert kinds[:3] == [Connected, Listening, TunnelReady]
    assert Listening("SSH", port) in events and StreamStarted("SSH", 1) in events
    text = caplog.text
    assert "Starting proxy in source mode" in text and "Starting proxy in destination mode" in text
    assert f"Listening for new connection on port {port}" in text
    assert f"Accepted tcp connection on port {port} from 127.0.0.1:" in text
    assert f"Attempting to establish tcp socket connection to: 127.0.0.1:{app.port}" in text
    assert "Disconnected from: " in text
    assert tunnel.source_token not in text and tunnel.destination_token not in text
    app.close()


async def test_slow_local_reader_bounds_memory_and_loses_nothing(proxy_emulator: Emulator) -> None:
    blob = os.urandom(48 * 1024 * 1024)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await App(app).start()
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        _, src, _ = await start_pair(stack, proxy_emulator, {"SSH": server.target()})
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", src.ports["SSH"]))
        # The source app reads nothing: its proxy's writer fills up past its mark, then past
        # the receive budget, and the session stops reading the websocket.
        engine = src._engine  # noqa: SLF001 - the flow-control state under test
        for _ in range(1000):
            if engine.paused_writers and not engine.writers_drained.is_set():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the session never stopped reading")
        (conn,) = engine.paused_writers
        assert conn.transport is not None
        budget = src.config.settings.receive_budget_bytes
        assert adapters.WRITE_HIGH < conn.transport.get_write_buffer_size() <= budget + 2 * 131076
        digest = hashlib.sha256()
        remaining = len(blob)
        for _ in range(100_000):
            if not remaining:
                break
            chunk = await asyncio.wait_for(loop.sock_recv(sock, min(remaining, 1 << 20)), TIMEOUT)
            assert chunk
            digest.update(chunk)
            remaining -= len(chunk)
        assert digest.digest() == hashlib.sha256(blob).digest()
        sock.close()
    server.close()


# --- two proxies sharing one token ------------------------------------------------------


async def test_two_destinations_sharing_a_token_back_off_instead_of_duelling(
    proxy_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Same token and client token: the service replaces the older at each connect. The replaced
    one warns once and reconnects after growing delays, not at every 50 ms retry (~20 a second)."""
    caplog.set_level(logging.INFO, logger="localproxy.proxy")
    emulator = proxy_emulator
    tunnel = emulator.open_tunnel(services=["SSH"])
    tunnel_id = tunnel.tunnel_id
    client_token = "duel-" + "c" * 40
    unused_target = {"SSH": DestinationTarget("127.0.0.1", 9)}  # no source: never connected to
    shared = config(Mode.DESTINATION, tunnel.destination_token, emulator, unused_target)
    assert shared.settings.retry_delay_ms == 50
    replaced = {"first": 0, "second": 0}

    def count_replaced(name: str) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if isinstance(event, Disconnected) and "replaced" in event.reason:
                replaced[name] += 1
                emulator.events.changed()  # wake the waits below: they re-check their condition

        return on_event

    def replacements(since: int) -> int:
        return sum(1 for e in emulator.events.history if e.kind == "replaced" and e.tunnel_id == tunnel_id
                   and e.seq > since)

    async with LocalProxy(shared, client_token=client_token) as first:
        first.subscribe(count_replaced("first"))
        await asyncio.wait_for(first.ready, TIMEOUT)
        mark = emulator.event_mark()
        async with LocalProxy(shared, client_token=client_token) as second:
            second.subscribe(count_replaced("second"))
            start = await emulator.wait_event("replaced", since=mark, tunnel_id=tunnel_id, timeout=TIMEOUT)
            # Must not happen: the duel's rate (bounded window, a condition expected to time out).
            with pytest.raises(TimeoutError):
                await emulator.events.wait_until(lambda: replacements(start.seq) >= 6, 1.0)
            # They still take turns, slowly: the first comes back and is replaced a second time.
            await emulator.events.wait_until(lambda: replaced["first"] >= 2 and replaced["second"] >= 1, TIMEOUT)
            assert emulator.handshake_count(tunnel_id, "destination") < 10
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "Another local proxy connected" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per proxy, though the first was replaced twice
    assert "this tunnel's destination token" in warnings[0] and "sharing" in warnings[0]
    assert client_token not in caplog.text and tunnel.destination_token not in caplog.text


# --- the same engine on uvloop (what the CLI runs on) --------------------------------------

UVLOOP_SCENARIOS: dict[str, Callable[[Emulator], Awaitable[None]]] = {
    "integrity": test_integrity_several_mib_each_way,
    "twenty": test_twenty_simultaneous_connections_on_one_service,
    "unix": test_unix_socket_destination,
    "down": test_destination_down_closes_the_source_connection,
    "eof": test_eof_flushes_data_both_ways,
    "reconnect": test_reconnect_after_the_emulator_drops_the_session,
    "v2": functools.partial(
        test_older_destination_with_destination_client_type, client_type="V2", destination_subprotocol=V2
    ),
    "slow-reader": test_slow_local_reader_bounds_memory_and_loses_nothing,
}


@pytest.mark.parametrize("name", sorted(UVLOOP_SCENARIOS))
def test_scenarios_on_uvloop(name: str) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with Emulator() as emulator:
            await UVLOOP_SCENARIOS[name](emulator)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 60))
