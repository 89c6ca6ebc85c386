"""Shared pytest fixtures (each helper appends its own; names say whose)."""

from __future__ import annotations

# --- global state (owner: coordinator) ------------------------------------------
from collections.abc import Iterator as _Iterator

import pytest as _pytest


@_pytest.fixture(autouse=True)
def _undo_global_logging_state() -> _Iterator[None]:
    """A test that runs a CLI ``main`` in-process installs our log handler with
    ``propagate = False`` and registers secrets; undo both so later tests'
    ``caplog`` still sees records, unmasked by another test's tokens."""
    yield
    from localproxy.ops.logs import forget_secrets, reset_logging

    reset_logging()
    forget_secrets()  # a test's short fake token must not mask words in later tests

# --- emulator fixtures (owner: emulator helper) --------------------------------

import ssl as _emulator_ssl
from collections.abc import AsyncIterator as _EmulatorAsyncIterator
from pathlib import Path as _EmulatorPath
from typing import Any as _EmulatorAny

import pytest as _emulator_pytest
import trustme as _emulator_trustme


@_emulator_pytest.fixture
async def emulator() -> _EmulatorAsyncIterator[_EmulatorAny]:
    """A plain (ws/http) emulator on a free loopback port."""
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0) as emu:
        yield emu


@_emulator_pytest.fixture
def emulator_ca() -> _emulator_trustme.CA:
    """A test CA (trustme) that signs the TLS emulator's certificate."""
    return _emulator_trustme.CA()


@_emulator_pytest.fixture
def emulator_client_ssl(emulator_ca: _emulator_trustme.CA) -> _emulator_ssl.SSLContext:
    """A client TLS context trusting ``emulator_ca``."""
    context = _emulator_ssl.create_default_context()
    emulator_ca.configure_trust(context)
    return context


@_emulator_pytest.fixture
async def emulator_tls(
    emulator_ca: _emulator_trustme.CA, tmp_path: _EmulatorPath
) -> _EmulatorAsyncIterator[_EmulatorAny]:
    """A wss/https emulator whose certificate (127.0.0.1, localhost) ``emulator_ca`` signed."""
    from localproxy.emulator import Emulator

    leaf = emulator_ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "emulator-cert.pem", tmp_path / "emulator-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    async with Emulator(host="127.0.0.1", port=0, tls=True, cert=cert, key=key) as emu:
        yield emu


# --- reliability fixtures (owner: benchmarks-and-reliability helper) -----------------
# Used by tests/test_reliability_*.py, test_leaks.py, test_fuzz_session.py, test_security.py.

import asyncio as _rel_asyncio
import os as _rel_os
from dataclasses import dataclass as _rel_dataclass
from dataclasses import field as _rel_field

REL_TIMEOUT = 10.0
REL_ROOT = _EmulatorPath(__file__).resolve().parent.parent


class RelApp:
    """A destination app on 127.0.0.1: ``echo`` or ``sink`` (records every byte per connection).

    ``conns`` lists each accepted connection's received bytes; ``closed`` futures
    resolve when that connection ended (True: EOF/close, False: reset). ``read_gate``
    (sink): while cleared the app does not read, so its socket fills up.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.conns: list[bytearray] = []
        self.closed: list[_rel_asyncio.Future[bool]] = []
        self.accepted = _rel_asyncio.Event()
        self.progress = _rel_asyncio.Event()  # set on every chunk received
        self.read_gate = _rel_asyncio.Event()
        self.read_gate.set()
        self.server: _rel_asyncio.Server | None = None
        self.writers: list[_rel_asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> "RelApp":
        self.server = await _rel_asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: _rel_asyncio.StreamReader, writer: _rel_asyncio.StreamWriter) -> None:
        received = bytearray()
        done: _rel_asyncio.Future[bool] = _rel_asyncio.get_running_loop().create_future()
        self.conns.append(received)
        self.closed.append(done)
        self.writers.append(writer)
        self.accepted.set()
        clean = True
        try:
            while True:
                await self.read_gate.wait()
                data = await reader.read(65536)
                if not data:
                    break
                received += data
                self.progress.set()
                if self.kind == "echo":
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            clean = False
        finally:
            writer.close()
            if not done.done():
                done.set_result(clean)
            self.progress.set()

    def target(self) -> _EmulatorAny:
        from localproxy.types import DestinationTarget

        return DestinationTarget(host="127.0.0.1", port=self.port)

    async def wait_received(self, index: int, size: int, timeout: float = REL_TIMEOUT) -> None:
        """Until connection ``index`` received ``size`` bytes or ended."""

        async def check() -> None:
            while True:
                if len(self.conns) > index and (len(self.conns[index]) >= size or self.closed[index].done()):
                    return
                self.progress.clear()
                await self.progress.wait()

        await _rel_asyncio.wait_for(check(), timeout)

    def abort_connections(self) -> None:
        """Reset (RST) every open connection of the app."""
        for writer in self.writers:
            writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.abort_connections()
            await _rel_asyncio.wait_for(self.server.wait_closed(), REL_TIMEOUT)


@_rel_dataclass
class RelPair:
    """A source and a destination LocalProxy in this event loop, joined by ``emulator``."""

    emulator: _EmulatorAny
    tunnel: _EmulatorAny
    src: _EmulatorAny
    dst: _EmulatorAny
    src_events: list[_EmulatorAny] = _rel_field(default_factory=list)
    dst_events: list[_EmulatorAny] = _rel_field(default_factory=list)

    def port(self, service: str = "SSH") -> int:
        return int(self.src.ports[service])

    async def connect(self, service: str = "SSH") -> tuple[_rel_asyncio.StreamReader, _rel_asyncio.StreamWriter]:
        return await _rel_asyncio.wait_for(_rel_asyncio.open_connection("127.0.0.1", self.port(service)), REL_TIMEOUT)

    async def echo_roundtrip(self, data: bytes, service: str = "SSH") -> bytes:
        reader, writer = await self.connect(service)
        try:
            writer.write(data)
            return await _rel_asyncio.wait_for(reader.readexactly(len(data)), REL_TIMEOUT)
        finally:
            writer.close()

    async def wait_serving(self, service: str = "SSH") -> None:
        """Both sides connected to the emulator and the source listening again."""
        await self.emulator.wait_connected(self.tunnel.tunnel_id, "source")
        await self.emulator.wait_connected(self.tunnel.tunnel_id, "destination")

        async def listening() -> None:
            for _ in range(1000):
                if service in self.src.ports:
                    return
                await _rel_asyncio.sleep(0.01)  # bounded poll: ports has no event of its own
            raise AssertionError("source proxy is not listening")

        await _rel_asyncio.wait_for(listening(), REL_TIMEOUT)


def rel_settings(**overrides: _EmulatorAny) -> _EmulatorAny:
    """Fast retries for tests (50 ms), everything else as the defaults."""
    from localproxy.settings import Settings

    values: dict[str, _EmulatorAny] = dict(retry_delay_ms=50, tcp_connection_retry_count=1,
                                          tcp_connection_retry_delay_ms=50)
    values.update(overrides)
    return Settings(**values)


def rel_config(mode: _EmulatorAny, token: str, emulator: _EmulatorAny, services: dict[str, _EmulatorAny],
               **kw: _EmulatorAny) -> _EmulatorAny:
    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.types import Mode, ServiceEndpoint

    kw.setdefault("settings", rel_settings())
    if mode is Mode.SOURCE:
        kw.setdefault("bind_address", "127.0.0.1")
    return ProxyConfig(mode=mode, access_token=token, endpoint=ServiceEndpoint.parse(emulator.data_url),
                       services=services, **kw)


@_emulator_pytest.fixture
async def rel_pair_factory() -> _EmulatorAsyncIterator[_EmulatorAny]:
    """``await make(emulator, {"SSH": app}, source_kw=..., destination_kw=...)`` -> RelPair; closed at teardown."""
    from contextlib import AsyncExitStack

    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.types import Mode, SourcePort

    async with AsyncExitStack() as stack:

        async def make(emulator: _EmulatorAny, apps: dict[str, RelApp], *, source_kw: dict | None = None,
                       destination_kw: dict | None = None, client_tokens: tuple[str | None, str | None] = (None, None)
                       ) -> RelPair:
            tunnel = emulator.open_tunnel(services=list(apps))
            targets = {name: app.target() for name, app in apps.items()}
            dst = LocalProxy(rel_config(Mode.DESTINATION, tunnel.destination_token, emulator, targets,
                                        **(destination_kw or {})), client_token=client_tokens[1])
            src = LocalProxy(rel_config(Mode.SOURCE, tunnel.source_token, emulator,
                                        {name: SourcePort(0) for name in apps}, **(source_kw or {})),
                             client_token=client_tokens[0])
            pair = RelPair(emulator, tunnel, src, dst)
            dst.subscribe(pair.dst_events.append)
            src.subscribe(pair.src_events.append)
            await stack.enter_async_context(dst)
            await stack.enter_async_context(src)
            await _rel_asyncio.wait_for(_rel_asyncio.gather(dst.ready, src.ready), REL_TIMEOUT)
            await emulator.wait_connected(tunnel.tunnel_id, "destination")
            return pair

        yield make


# One process helper for every test file: tests/proxyproc.py.
from proxyproc import ProxyProcess as RelProcess  # noqa: E402


@_emulator_pytest.fixture
async def rel_processes() -> _EmulatorAsyncIterator[_EmulatorAny]:
    """``await start(*args, env=...)`` -> RelProcess; every child is killed at teardown."""
    started: list[RelProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> RelProcess:
        child = await RelProcess.start(*args, extra_env=env)
        started.append(child)
        return child

    yield start
    for child in started:
        await child.kill()


def rel_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc (0 once it is gone)."""
    try:
        for line in _EmulatorPath(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rel_fd_count(pid: int | str = "self") -> int:
    return len(_rel_os.listdir(f"/proc/{pid}/fd"))


def rel_listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of LISTEN sockets on ``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _EmulatorPath(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def rel_kernel_queued(ports: set[int]) -> int:
    """Bytes the kernel holds (send + receive queues) in established TCP sockets touching ``ports``."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _EmulatorPath(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(x.rsplit(":", 1)[1], 16) for x in fields[1:3])
            if fields[3] == "01" and (local in ports or remote in ports):
                tx, rx = fields[4].split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


@_emulator_pytest.fixture
def rel_kit() -> _EmulatorAny:
    """The reliability helpers above as one namespace (conftest is not importable by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        App=RelApp, Pair=RelPair, Process=RelProcess, settings=rel_settings, config=rel_config,
        rss_kib=rel_rss_kib, fd_count=rel_fd_count, listening_addresses=rel_listening_addresses,
        kernel_queued=rel_kernel_queued,
        TIMEOUT=REL_TIMEOUT, ROOT=REL_ROOT,
    )
