"""The one source proxy of ``localproxy connect`` for a thing: finds or opens the tunnel,
gets the device connected, opens connections to its services.

Used by the shared server (``server.py``, one per user and thing) and, where there is
no Unix socket to share it through, in the ``connect`` process itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from localproxy.config.proxy_config import ProxyConfig
from localproxy.connect.control import Control
from localproxy.connect.plan import (
    Next,
    TunnelView,
    choose_tunnel,
    next_step,
    not_connected_advice,
    poll_delays,
    waiting_message,
)
from localproxy.errors import (
    ConfigError,
    ConnectionFailedError,
    DeviceNotConnectedError,
    LocalProxyError,
    TunnelClosedError,
)
from localproxy.events import Connected, Disconnected
from localproxy.ops.logs import register_secret
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.tokens.source import generate_client_token
from localproxy.types import InProcess, Mode, ServiceEndpoint

log = logging.getLogger("localproxy.connect")
Say = Callable[[str], None]
READY_TIMEOUT = 30.0  # the source's websocket handshake, with the proxy's own retries


@dataclass(frozen=True)
class SourceOptions:
    thing: str
    region: str | None = None
    endpoint: str | None = None  # data plane (-e); default: the region's
    api_url: str | None = None  # control plane; default: boto3's (AWS_ENDPOINT_URL, region)
    tunnel_minutes: int = 720
    last_tunnel_file: str | None = None  # remembers our last tunnel (see plan.choose_tunnel)


class ThingSource:
    """One source LocalProxy on one tunnel of a thing, set up on first use."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        self.control: Control | None = None
        self.tunnel: TunnelView | None = None
        self.proxy: LocalProxy | None = None
        self.fatal: LocalProxyError | None = None  # the proxy stopped for good
        self.last_error: LocalProxyError | None = None  # why the last proxy stopped
        self._published = False  # a destination token is out and the device has not connected yet
        self._setup = asyncio.Lock()
        self._session_up = False  # the source's websocket is connected now
        self._changed = asyncio.Event()  # set on every session or fatal change
        # Called when the source proxy stops by itself (``error``: why, None: it ended).
        self.on_stopped: Callable[[LocalProxyError | None], None] = lambda error: None

    async def open_connection(
        self, service: str, wait: float, say: Say
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``service`` on the thing; sets up the tunnel and waits for the device first."""
        proxy = await self.ready_for(service, wait, say)
        return await proxy.open_connection(service)

    def active_connections(self) -> int:
        proxy = self.proxy
        return sum(proxy.stats().active_connections.values()) if proxy is not None else 0

    async def ready_for(self, service: str, wait: float, say: Say) -> LocalProxy:
        """The source proxy, its tunnel set up and the device connected, for ``service``."""
        for attempt in range(2):  # a tunnel closed under us: once more on a new one
            async with self._setup:
                proxy, tunnel = await self._ensure_source(service, say)
            try:
                await self._ensure_destination(tunnel, wait, say)
            except TunnelClosedError:
                if attempt:
                    raise
                say(f"tunnel {tunnel.tunnel_id} was closed: starting again")
                await self._drop_proxy(proxy)
                continue
            return proxy
        raise AssertionError("unreachable")

    async def close(self, close_tunnel: bool = False) -> None:
        proxy, tunnel = self.proxy, self.tunnel
        self.proxy = None  # stopping on purpose: _watch leaves the state alone
        if proxy is not None:
            await proxy.close()
        if close_tunnel and tunnel is not None and self.control is not None:
            try:
                await asyncio.to_thread(self.control.close, tunnel.tunnel_id)
                log.info("closed tunnel %s", tunnel.tunnel_id)
            except LocalProxyError as exc:
                log.warning("could not close tunnel %s: %s", tunnel.tunnel_id, exc)

    # --- set-up ---------------------------------------------------------------------

    async def _ensure_source(self, service: str, say: Say) -> tuple[LocalProxy, TunnelView]:
        if self.fatal is not None:
            raise self.fatal
        if self.proxy is not None and self.tunnel is not None:
            if service not in self.tunnel.services:
                raise ConfigError(
                    f"the shared source of {self.options.thing} uses tunnel {self.tunnel.tunnel_id}, "
                    f"which offers {', '.join(self.tunnel.services)} but not {service}"
                )
            return self.proxy, self.tunnel
        if self.control is None:
            self.control = await asyncio.to_thread(Control, self.options.region, self.options.api_url)
        control, thing = self.control, self.options.thing
        views = await asyncio.to_thread(control.open_tunnels, thing)
        choice = choose_tunnel(views, thing, service, self._last_tunnel())
        say(choice.note)
        if choice.tunnel is None:
            tunnel_id, token = await asyncio.to_thread(control.open_tunnel, thing, [service], self.options.tunnel_minutes)
            register_secret(token)
            self.tunnel = TunnelView(tunnel_id, True, thing, (service,), False, False, time.time())
            self._published = True  # OpenTunnel with a thing name notifies the device
            say(f"opened tunnel {tunnel_id} to {thing} ({service}, up to {self.options.tunnel_minutes} min)")
        else:
            # Safe: no live source of ours is on it (plan.choose_tunnel), so nobody is kicked.
            token = await asyncio.to_thread(control.rotate_source, choice.tunnel.tunnel_id)
            register_secret(token)
            self.tunnel = choice.tunnel
            self._published = False
        self._remember(self.tunnel.tunnel_id)
        endpoint = (
            ServiceEndpoint.parse(self.options.endpoint)
            if self.options.endpoint
            else ServiceEndpoint.for_region(control.region)
        )
        config = ProxyConfig(
            mode=Mode.SOURCE, access_token=token, endpoint=endpoint, region=control.region,
            services={name: InProcess() for name in self.tunnel.services},
        )  # fmt: skip
        # A client token of our own: the proxy can reconnect after a drop with the same access token.
        proxy = LocalProxy(config, client_token=generate_client_token(), name=self.tunnel.tunnel_id)
        proxy.subscribe(self._on_event)
        proxy.start()
        try:
            await asyncio.wait_for(asyncio.shield(proxy.ready), READY_TIMEOUT)
        except BaseException:
            await proxy.close()
            raise
        self.proxy = proxy
        asyncio.get_running_loop().create_task(self._watch(proxy))
        return proxy, self.tunnel

    async def _ensure_destination(self, tunnel: TunnelView, wait: float, say: Say) -> None:
        assert self.control is not None
        control, thing = self.control, self.options.thing
        view = await asyncio.to_thread(control.describe, tunnel.tunnel_id)
        delays = poll_delays(wait)
        told = False
        while True:
            step = next_step(view, self._published)
            if step is Next.READY:
                self._published = False
                return
            if step is Next.CLOSED:
                raise TunnelClosedError(f"tunnel {tunnel.tunnel_id} is closed")
            if step is Next.ROTATE_DESTINATION:
                await asyncio.to_thread(control.rotate_destination, tunnel.tunnel_id, thing, list(tunnel.services))
                self._published = True
            if not told:
                say(waiting_message(thing, tunnel.tunnel_id, wait))
                told = True
            delay = next(delays, None)
            if delay is None:
                self._published = False  # the next attempt publishes a fresh token again
                raise DeviceNotConnectedError(not_connected_advice(thing, tunnel.tunnel_id, wait))
            await asyncio.sleep(delay)
            view = await asyncio.to_thread(control.describe, tunnel.tunnel_id)

    def _on_event(self, event: object) -> None:
        if isinstance(event, (Connected, Disconnected)):
            self._session_up = isinstance(event, Connected)
            self._changed.set()

    async def why_dropped(self, timeout: float) -> LocalProxyError | None:
        """After a connection ended: None if the source's session is up (the far end closed it);
        else wait (bounded) to learn whether the proxy stopped for good (its error) or
        reconnected (the connection was lost with the old session)."""
        await asyncio.sleep(0)  # let the proxy's own events about this drop arrive first
        if self._session_up and self.proxy is not None:
            return None
        try:
            async with asyncio.timeout(timeout):
                while not self._session_up and self.proxy is not None and self.fatal is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pass
        if self.fatal is not None:
            return self.fatal
        if self.proxy is None and self.last_error is not None:
            return self.last_error
        return ConnectionFailedError("the connection was lost when the source's websocket dropped: run the command again")

    async def _watch(self, proxy: LocalProxy) -> None:
        error: LocalProxyError | None = None
        try:
            await proxy.wait_closed()
        except asyncio.CancelledError:
            return
        except LocalProxyError as exc:
            error = exc
        if proxy is not self.proxy:
            return  # dropped on purpose
        if error is None or isinstance(error, TunnelClosedError):
            self.proxy, self.tunnel = None, None  # the next connection starts again
        else:
            self.fatal = error  # e.g. our token revoked: another proxy took the tunnel over
        if error is not None:
            log.error("the source proxy stopped: %s", error)
        self.last_error = error
        self._changed.set()
        self.on_stopped(error)

    async def _drop_proxy(self, proxy: LocalProxy) -> None:
        async with self._setup:
            if self.proxy is proxy:
                self.proxy, self.tunnel = None, None
                await proxy.close()

    def _last_tunnel(self) -> str | None:
        path = self.options.last_tunnel_file
        if path is None:
            return None
        try:
            with open(path, encoding="ascii") as file:
                return file.read().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def _remember(self, tunnel_id: str) -> None:
        if self.options.last_tunnel_file is not None:
            try:
                with open(self.options.last_tunnel_file, "w", encoding="ascii") as file:
                    file.write(tunnel_id)
            except OSError as exc:
                log.debug("cannot remember the tunnel id: %s", exc)
