"""A device's echo app reached through a tunnel: emulator, two proxies, one round trip."""

import asyncio

from localproxy import (
    DestinationTarget,
    LocalProxy,
    Mode,
    ProxyConfig,
    ServiceEndpoint,
    SourcePort,
)
from localproxy.emulator import Emulator


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))  # stands in for the device's sshd
    await writer.drain()
    writer.close()


async def main() -> None:
    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with app, Emulator() as service:  # the tunneling service, on a free loopback port
        tunnel = service.open_tunnel(services=["SSH"])  # with AWS: boto3's open_tunnel
        endpoint = ServiceEndpoint.parse(service.data_url)  # with AWS: ServiceEndpoint.for_region("us-east-1")
        device = ProxyConfig(
            mode=Mode.DESTINATION,
            access_token=tunnel.destination_token,
            endpoint=endpoint,
            services={"SSH": DestinationTarget("127.0.0.1", app.sockets[0].getsockname()[1])},
        )
        laptop = ProxyConfig(
            mode=Mode.SOURCE,
            access_token=tunnel.source_token,
            endpoint=endpoint,
            services={"SSH": SourcePort(0)},  # 0: any free port
        )
        async with LocalProxy(device) as destination, LocalProxy(laptop) as source:
            source.subscribe(print)  # typed events: Connected, TunnelReady, StreamStarted, ...
            await asyncio.wait_for(asyncio.gather(destination.ready, source.ready), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", source.ports["SSH"])
            writer.write(b"hello, device")
            print(await asyncio.wait_for(reader.read(100), 10), source.subprotocol)
            writer.close()
            print(dict(source.stats().bytes_sent))  # stats(): a frozen ProxyStats snapshot


asyncio.run(main())
