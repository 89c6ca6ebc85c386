"""``python -m localproxy.emulator --demo``: the whole product in one command.

Starts the emulator in-process, opens a tunnel with one service, runs an echo
service, a destination proxy and a source proxy, sends data through the tunnel
and checks it, then shows what a spent access token looks like and prints the
commands to do the same by hand. Needs no AWS account and no network.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
from typing import Any, TextIO

DEMO_BYTES = 4 * 1024 * 1024
SERVICE = "ECHO"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(view), 65536):
            writer.write(view[offset : offset + 65536])
            await writer.drain()

    sender = asyncio.create_task(send())
    received = await reader.readexactly(len(payload))
    await sender
    writer.close()
    return received


async def demo(out: TextIO = sys.stdout) -> int:
    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.emulator import Emulator
    from localproxy.errors import LocalProxyError
    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.settings import Settings
    from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    echo_server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]
    settings = Settings(retry_delay_ms=200)
    async with echo_server, Emulator(host="127.0.0.1", port=0) as emu:
        endpoint = ServiceEndpoint.parse(emu.data_url)
        tunnel = emu.open_tunnel(services=[SERVICE], thing_name="demo-thing")
        say(f"1. Emulator of the tunneling service: control API {emu.api_url}, data plane {emu.data_url}")
        say(f"   Opened tunnel {tunnel.tunnel_id} with service {SERVICE} (echo on 127.0.0.1:{echo_port}).")

        destination = ProxyConfig(
            mode=Mode.DESTINATION,
            access_token=tunnel.destination_token,
            endpoint=endpoint,
            services={SERVICE: DestinationTarget("127.0.0.1", echo_port)},
            settings=settings,
        )
        source = ProxyConfig(
            mode=Mode.SOURCE,
            access_token=tunnel.source_token,
            endpoint=endpoint,
            services={SERVICE: SourcePort(0)},
            settings=settings,
        )
        started = time.perf_counter()
        async with LocalProxy(destination) as dst_proxy, LocalProxy(source) as src_proxy:
            await asyncio.wait_for(dst_proxy.ready, 10)
            await asyncio.wait_for(src_proxy.ready, 10)
            port = src_proxy.ports[SERVICE]
            setup_ms = (time.perf_counter() - started) * 1000
            say(f"2. Destination and source proxies connected ({src_proxy.subprotocol}) in {setup_ms:.0f} ms;")
            say(f"   the source proxy listens on localhost:{port}.")
            state = emu.describe(tunnel.tunnel_id)
            say(
                "   describe-tunnel: source "
                f"{state['sourceConnectionState']['status']}, destination "
                f"{state['destinationConnectionState']['status']}"
            )
            payload = os.urandom(DEMO_BYTES)
            t0 = time.perf_counter()
            echoed = await asyncio.wait_for(_round_trip(port, payload), 60)
            elapsed = time.perf_counter() - t0
            intact = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            say(
                f"3. Sent {DEMO_BYTES >> 20} MiB through the tunnel and back in {elapsed * 1000:.0f} ms "
                f"({2 * DEMO_BYTES / elapsed / 1e6:.0f} MB/s both ways); sha256 "
                + ("matches." if intact else "DIFFERS!")
            )

        # The classic failure: an access token is single-use without a client token.
        reused = ProxyConfig(
            mode=Mode.SOURCE,
            access_token=tunnel.source_token,
            endpoint=endpoint,
            services={SERVICE: SourcePort(0)},
            settings=Settings(connect_retry_count=0),
            region="us-east-1",
            tunnel_id=tunnel.tunnel_id,
        )
        say("4. Restarting the source proxy with the same access token (a classic mistake):")
        try:
            async with LocalProxy(reused, client_token=None) as again:
                await asyncio.wait_for(again.wait_closed(), 10)
            say("   unexpectedly accepted")
        except LocalProxyError as error:
            say(f"   refused, exit code {error.exit_code}. The proxy explains:")
            for line in str(error).splitlines():
                say(f"   | {line}")

    say()
    say(_BY_HAND)
    return 0 if intact else 1


_BY_HAND = """To do the same by hand (three terminals, no AWS account needed; the aws CLI: pip install awscli):
  python -m localproxy.emulator --port 8443
  export AWS_ENDPOINT_URL=http://127.0.0.1:8443 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1
  aws iotsecuretunneling open-tunnel --destination-config thingName=demo,services=SSH
  AWSIOT_TUNNEL_ACCESS_TOKEN=<destinationAccessToken> localproxy -e ws://127.0.0.1:8443 -d SSH=22
  AWSIOT_TUNNEL_ACCESS_TOKEN=<sourceAccessToken> localproxy -e ws://127.0.0.1:8443 -s SSH=5555
  ssh -p 5555 user@localhost"""


def run_demo(args: Any = None) -> int:
    """Entry point used by ``python -m localproxy.emulator --demo``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("localproxy").setLevel(logging.CRITICAL)
    return asyncio.run(demo())
