"""A tunnel whose source proxy reaches the service through an HTTP CONNECT proxy (HTTPS_PROXY)."""

from __future__ import annotations

import asyncio
import os

from connect_proxy import ConnectProxy
from proxyproc import TIMEOUT, echo_app

from localproxy.config.proxy_config import ProxyConfig
from localproxy.emulator import Emulator
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort


async def test_data_flows_through_a_connect_proxy_with_basic_auth() -> None:
    app, app_port = await echo_app()
    async with Emulator() as emulator, ConnectProxy("ops", "s3cret") as web_proxy:
        tunnel = emulator.open_tunnel(services=["SSH"])
        endpoint = ServiceEndpoint.parse(emulator.data_url)
        settings = Settings(retry_delay_ms=50)
        destination = ProxyConfig(
            mode=Mode.DESTINATION, access_token=tunnel.destination_token, endpoint=endpoint,
            services={"SSH": DestinationTarget("127.0.0.1", app_port)}, settings=settings,
        )
        source = ProxyConfig(
            mode=Mode.SOURCE, access_token=tunnel.source_token, endpoint=endpoint,
            services={"SSH": SourcePort(0)}, bind_address="127.0.0.1", settings=settings,
            https_proxy=f"http://ops:s3cret@127.0.0.1:{web_proxy.port}",
        )
        async with LocalProxy(destination) as dst, LocalProxy(source) as src:
            await asyncio.wait_for(asyncio.gather(dst.ready, src.ready), TIMEOUT)
            reader, writer = await asyncio.open_connection("127.0.0.1", src.ports["SSH"])
            payload = os.urandom(2 * 1024 * 1024)
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
            writer.close()
        # Only the source went through the web proxy, to the emulator's port.
        assert web_proxy.targets == [f"127.0.0.1:{endpoint.port}"]
    app.close()
