"""A source and a destination proxy joined through the emulator: what ``tunnel_pair`` makes.

In-process (:class:`~localproxy.proxy.local_proxy.LocalProxy`) by default, or the
``localproxy`` command as two child processes. The fixture starts them on an event loop
of their own thread (:class:`PairFactory`), so a ``def`` test gets a running pair from
``tunnel_pair({...})`` and an ``async def`` test from ``await tunnel_pair({...})``.
Everything a pair started is stopped by :meth:`TunnelPair.close` (the fixture calls it
at teardown).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shutil
import socket
import tempfile
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localproxy.config.mappings import parse_mapping
from localproxy.config.proxy_config import ProxyConfig
from localproxy.config.settings_json import export_settings
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.testing.loop_thread import CALL_TIMEOUT, LoopThread, running_loop
from localproxy.testing.processes import LISTENING, ProxyProcess
from localproxy.types import Mode, ServiceEndpoint, SourcePort

if TYPE_CHECKING:
    from localproxy.emulator import Emulator, TunnelInfo
    from localproxy.testing.service import ThreadedEmulator

    Service = Emulator | ThreadedEmulator

TIMEOUT = 15.0
SOURCE_HOST = "127.0.0.1"
# Retries after 50 ms instead of 2.5 s: a test that drops a session reconnects at once.
FAST_SETTINGS = Settings(retry_delay_ms=50, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=50)

DestinationApps = Mapping[str, "int | str"]


@dataclass
class TunnelPair:
    """A running pair: connect to ``source_host:source_ports[service]`` to reach that service."""

    service: Service
    tunnel: TunnelInfo
    source: LocalProxy | ProxyProcess
    destination: LocalProxy | ProxyProcess
    source_ports: dict[str, int]
    source_host: str = SOURCE_HOST
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack, repr=False)
    # The loop thread the proxies run on (None: the caller's own loop).
    runner: LoopThread | None = field(default=None, repr=False)

    @property
    def tunnel_id(self) -> str:
        return self.tunnel.tunnel_id

    def connect(self, service: str, timeout: float = TIMEOUT) -> socket.socket:
        """A blocking TCP connection to the source proxy's port for ``service`` (for ``def`` tests)."""
        return socket.create_connection((self.source_host, self.source_ports[service]), timeout=timeout)

    async def open_connection(self, service: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to the source proxy's port for ``service``."""
        return await asyncio.wait_for(
            asyncio.open_connection(self.source_host, self.source_ports[service]), TIMEOUT
        )

    def close(self) -> Any:
        """Stop both proxies (source first); again is a no-op.

        Blocks in a ``def`` test; in an ``async def`` test returns an awaitable (``await pair.close()``).
        """
        if self.runner is None:
            return self._stack.aclose()
        return self.runner.dual(self._stack.aclose())


def destination_mapping(apps: DestinationApps) -> str:
    """``{"SSH": 2222, "WEB": "host:80"}`` -> ``SSH=127.0.0.1:2222,WEB=host:80`` (``-d`` syntax)."""
    if not apps:
        raise ValueError("tunnel_pair needs at least one service: {'SSH': local_port}")
    parts = []
    for name, app in apps.items():
        target = f"{SOURCE_HOST}:{app}" if isinstance(app, int) else str(app)
        parts.append(f"{name}={target}")
    return ",".join(parts)


async def start_pair(
    service: Service,
    apps: DestinationApps,
    *,
    processes: bool = False,
    settings: Settings | None = None,
    thing_name: str | None = None,
    timeout: float = TIMEOUT,
) -> TunnelPair:
    """Open a tunnel with ``apps``' services, start its destination then its source proxy."""
    mapping = destination_mapping(apps)
    tunnel = service.open_tunnel(services=list(apps), thing_name=thing_name)
    stack = AsyncExitStack()
    source: LocalProxy | ProxyProcess
    destination: LocalProxy | ProxyProcess
    try:
        if processes:
            source, destination, ports = await _start_processes(service, tunnel, mapping, settings, stack, timeout)
        else:
            source, destination, ports = await _start_in_process(service, tunnel, mapping, settings, stack, timeout)
    except BaseException:
        await stack.aclose()
        raise
    return TunnelPair(service, tunnel, source, destination, ports, _stack=stack)


async def _start_in_process(
    service: Service, tunnel: TunnelInfo, mapping: str, settings: Settings | None,
    stack: AsyncExitStack, timeout: float,
) -> tuple[LocalProxy, LocalProxy, dict[str, int]]:  # fmt: skip
    targets, _ = parse_mapping(mapping, Mode.DESTINATION, "--destination-app")
    common: dict[str, Any] = dict(
        endpoint=ServiceEndpoint.parse(service.data_url),
        capath=str(service.capath) if service.capath is not None else None,
        settings=settings or FAST_SETTINGS,
    )
    destination = LocalProxy(ProxyConfig(Mode.DESTINATION, tunnel.destination_token, services=targets, **common))
    await stack.enter_async_context(destination)
    source = LocalProxy(
        ProxyConfig(
            Mode.SOURCE, tunnel.source_token, services={name: SourcePort(0) for name in targets},
            bind_address=SOURCE_HOST, **common,
        )
    )  # fmt: skip
    await stack.enter_async_context(source)
    await asyncio.wait_for(asyncio.gather(destination.ready, source.ready), timeout)
    await service.wait_connected(tunnel.tunnel_id, "destination", timeout)
    return source, destination, source.ports


async def _start_processes(
    service: Service, tunnel: TunnelInfo, mapping: str, settings: Settings | None,
    stack: AsyncExitStack, timeout: float,
) -> tuple[ProxyProcess, ProxyProcess, dict[str, int]]:  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="localproxy-pair-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    settings_json = workdir / "settings.json"
    export_settings(str(settings_json), settings or FAST_SETTINGS)
    common = ["-e", service.data_url, "--settings-json", str(settings_json)]
    if service.capath is not None:
        common += ["-c", str(service.capath)]
    service_ids = service.tunnel(tunnel.tunnel_id).service_ids

    destination = await ProxyProcess.start("-d", mapping, *common, token=tunnel.destination_token, cwd=str(workdir))
    stack.push_async_callback(stop_process, destination)
    await _connected(service, tunnel, "destination", destination, timeout)
    sources = ",".join(f"{name}=0" for name in service_ids)
    source = await ProxyProcess.start(
        "-s", sources, "-b", SOURCE_HOST, *common, token=tunnel.source_token, cwd=str(workdir)
    )
    stack.push_async_callback(stop_process, source)
    # One line per service, in the order of the SERVICE_IDS the source received
    # (the tunnel's order): the line itself does not name the service.
    lines = await source.wait_for_lines(LISTENING, len(service_ids), timeout)
    await _connected(service, tunnel, "source", source, timeout)
    return source, destination, {name: int(line.group(1)) for name, line in zip(service_ids, lines)}


async def _connected(
    service: Service, tunnel: TunnelInfo, side: str, child: ProxyProcess, timeout: float
) -> None:
    try:
        await service.wait_connected(tunnel.tunnel_id, side, timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise AssertionError(f"the {side} proxy did not connect within {timeout} s:\n{child.text}") from None


async def stop_process(child: ProxyProcess, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    try:
        await child.stop(timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError):
        pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            await child.kill()


class PairFactory:
    """``tunnel_pair({"SSH": port})``: the fixture's value; closes every pair at teardown.

    The pairs' proxies run on a loop thread of the factory's own, started at the first
    pair: in a ``def`` test a call blocks until the pair is up and returns it; in an
    ``async def`` test it returns an awaitable (``pair = await tunnel_pair({...})``).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        self.pairs: list[TunnelPair] = []
        self._starts: list[concurrent.futures.Future[TunnelPair]] = []
        self._runner: LoopThread | None = None

    def __call__(
        self,
        apps: DestinationApps,
        *,
        processes: bool = False,
        service: Service | None = None,
        settings: Settings | None = None,
        thing_name: str | None = None,
        timeout: float = TIMEOUT,
    ) -> Any:
        destination_mapping(apps)  # a bad mapping fails here, in the caller, sync or async
        if self._runner is None:
            self._runner = LoopThread("localproxy-pairs")
            self._runner.start()
        runner = self._runner

        async def start() -> TunnelPair:
            pair = await start_pair(
                service or self.service, apps, processes=processes, settings=settings, thing_name=thing_name,
                timeout=timeout,
            )  # fmt: skip
            pair.runner = runner
            self.pairs.append(pair)  # on the runner's thread only
            return pair

        future = runner.submit(start())
        self._starts.append(future)
        if running_loop() is not None:
            return asyncio.wrap_future(future)
        return future.result(timeout + CALL_TIMEOUT)

    def close_all(self) -> None:
        """Stop every pair (newest first) and the loop thread (blocking: the fixture's teardown)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            for start in self._starts:
                with contextlib.suppress(BaseException):
                    start.result(CALL_TIMEOUT)  # a pair still starting is stopped once up
            self._starts.clear()

            async def close_all() -> None:
                for pair in reversed(self.pairs):
                    await pair._stack.aclose()
                self.pairs.clear()

            runner.run(close_all())
        finally:
            runner.stop()
