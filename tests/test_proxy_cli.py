"""``python -m localproxy`` as a real process against the in-process Emulator."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import AsyncIterator

import pytest
from proxyproc import LISTENING, TIMEOUT, ProxyProcess, echo_app

from localproxy.emulator import Emulator
from localproxy.errors import ExitCode


@pytest.fixture
async def proxy_emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator:
        yield emulator


def endpoint(emulator: Emulator) -> str:
    return emulator.data_url  # ws://127.0.0.1:PORT (the CLI takes ws:// for the emulator)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_zero_after_listening(proxy_emulator: Emulator, signum: int) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    proxy = await ProxyProcess.start(
        "-e", endpoint(proxy_emulator), "-s", "0", "-b", "127.0.0.1", token=tunnel.source_token
    )
    try:
        match = await proxy.wait_for_line(LISTENING)
        assert int(match.group(1)) > 0
        await proxy_emulator.wait_connected(tunnel.tunnel_id, "source")
        assert await proxy.stop(signum) == 0
        await proxy_emulator.wait_disconnected(tunnel.tunnel_id, "source")
    finally:
        await proxy.kill()
    assert "Starting proxy in source mode" in proxy.text
    assert tunnel.source_token not in proxy.text


async def test_two_processes_tunnel_tcp(proxy_emulator: Emulator) -> None:
    app, app_port = await echo_app()
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    destination = await ProxyProcess.start(
        "-e", endpoint(proxy_emulator), "-d", f"SSH=127.0.0.1:{app_port}", token=tunnel.destination_token
    )
    source = await ProxyProcess.start(
        "-e", endpoint(proxy_emulator), "-s", "SSH=0", "-b", "127.0.0.1", token=tunnel.source_token
    )
    try:
        port = int((await source.wait_for_line(LISTENING)).group(1))
        await proxy_emulator.wait_connected(tunnel.tunnel_id, "destination")
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        payload = os.urandom(1024 * 1024)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
        writer.close()
        await destination.wait_for_line(
            re.compile(r"Attempting to establish tcp socket connection to: 127\.0\.0\.1")
        )
        await source.wait_for_line(re.compile(rf"Accepted tcp connection on port {port} from 127\.0\.0\.1"))
        assert await source.stop() == 0
        assert await destination.stop() == 0
    finally:
        await source.kill()
        await destination.kill()
        app.close()
    assert "Starting proxy in destination mode" in destination.text
    for line in (
        f"Attempting to establish web socket connection with endpoint {endpoint(proxy_emulator)}",
        "Web socket session ID: ",
        f"Successfully established websocket connection with proxy server: {endpoint(proxy_emulator)}",
        "Disconnected from: ",
    ):
        assert line in source.text and line in destination.text, line
    assert "[error]" not in source.text + destination.text
    assert re.search(r"^\[\d{4}-\d\d-\d\dT[\d:.]+\]\{\d+\}\[info\]", source.lines[0])


async def test_rejected_token_exits_with_its_code(proxy_emulator: Emulator) -> None:
    proxy_emulator.open_tunnel(services=["SSH"])
    proxy = await ProxyProcess.start("-e", endpoint(proxy_emulator), "-s", "0", token="bogus-token-value")
    try:
        code = await proxy.wait()
    finally:
        await proxy.kill()
    assert code == ExitCode.HANDSHAKE_REJECTED, proxy.text
    assert "[error]" in proxy.text
    assert "bogus-token-value" not in proxy.text


async def test_service_mismatch_exits_with_config_code(proxy_emulator: Emulator) -> None:
    tunnel = proxy_emulator.open_tunnel(services=["SSH"])
    proxy = await ProxyProcess.start(
        "-e", endpoint(proxy_emulator), "-d", "WEB=127.0.0.1:1", token=tunnel.destination_token
    )
    try:
        code = await proxy.wait()
    finally:
        await proxy.kill()
    assert code == ExitCode.CONFIG, proxy.text
    assert "WEB" in proxy.text
