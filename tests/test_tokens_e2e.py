"""The classic token failures, end to end: the real CLI process, the emulator, boto3.

Single-use access tokens, client tokens that bind them, restarts, rotation by
the tool itself, and no token in any log line at the highest verbosity.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path
from typing import AsyncIterator

import pytest
from proxyproc import LISTENING, TIMEOUT, ProxyProcess, echo_app
from websockets.asyncio.client import connect

from localproxy.emulator import Emulator
from localproxy.errors import ExitCode

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CLIENT_A = "a" * 8 + "-0000-4000-8000-" + "a" * 12
CLIENT_B = "b" * 8 + "-0000-4000-8000-" + "b" * 12


@pytest.fixture
async def token_emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator:
        yield emulator


async def spend_without_client_token(emulator: Emulator, token: str, mode: str = "source") -> None:
    """Use a token once as a client that sends no client token (what the C++ proxy does)."""
    url = f"{emulator.data_url}/tunnel?local-proxy-mode={mode}"
    async with connect(
        url,
        additional_headers={"access-token": token},
        subprotocols=["aws.iot.securetunneling-3.0"],  # type: ignore[list-item]
    ):
        pass


async def round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(payload)
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT)
    writer.close()
    return echoed


async def run_to_exit(*args: str, token: str, extra_env: dict[str, str] | None = None) -> ProxyProcess:
    proxy = await ProxyProcess.start(*args, token=token, extra_env=extra_env)
    try:
        await proxy.wait()
    finally:
        await proxy.kill()
    return proxy


async def test_reused_access_token_exits_3_and_says_what_to_run(token_emulator: Emulator) -> None:
    tunnel = token_emulator.open_tunnel(services=["SSH"])
    await spend_without_client_token(token_emulator, tunnel.source_token)
    proxy = await run_to_exit(
        "-e", token_emulator.data_url, "-s", "SSH=0", "--tunnel-id", tunnel.tunnel_id,
        token=tunnel.source_token, extra_env=AWS_ENV,
    )
    assert proxy.process.returncode == ExitCode.ACCESS_TOKEN_USED, proxy.text
    assert "previously used" in proxy.text
    assert "single-use" in proxy.text
    assert (
        f"aws iotsecuretunneling rotate-tunnel-access-token --tunnel-id {tunnel.tunnel_id} "
        "--client-mode SOURCE --region us-east-1"
    ) in proxy.text
    assert re.search(r"\[error\]", proxy.text)
    assert tunnel.source_token not in proxy.text
    assert token_emulator.handshake_count(tunnel.tunnel_id, "source") == 1  # no retry loop


async def test_restart_with_another_client_token_exits_4(token_emulator: Emulator) -> None:
    tunnel = token_emulator.open_tunnel(services=["SSH"])
    first = await ProxyProcess.start(
        "-e", token_emulator.data_url, "-s", "SSH=0", "-b", "127.0.0.1", "-i", CLIENT_A,
        token=tunnel.source_token,
    )
    try:
        await first.wait_for_line(LISTENING)
        assert await first.stop() == 0
    finally:
        await first.kill()
    second = await run_to_exit(
        "-e", token_emulator.data_url, "-s", "SSH=0", "-i", CLIENT_B, token=tunnel.source_token
    )
    assert second.process.returncode == ExitCode.CLIENT_TOKEN_MISMATCH, second.text
    assert "does not match" in second.text
    assert "--client-mode SOURCE" in second.text
    for secret in (tunnel.source_token, CLIENT_A, CLIENT_B):
        assert secret not in first.text + second.text


async def test_client_token_file_survives_a_restart(token_emulator: Emulator, tmp_path: Path) -> None:
    tunnel = token_emulator.open_tunnel(services=["SSH"])
    token_file = tmp_path / "client-token"
    args = ("-e", token_emulator.data_url, "-s", "SSH=0", "-b", "127.0.0.1",
            "--client-token-file", str(token_file))
    for run in range(2):
        proxy = await ProxyProcess.start(*args, token=tunnel.source_token)
        try:
            await proxy.wait_for_line(LISTENING)
            assert await proxy.stop() == 0, proxy.text
        finally:
            await proxy.kill()
        if run == 0:
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            saved = token_file.read_text().strip()
            assert re.fullmatch(r"[a-zA-Z0-9-]{32,128}", saved)
        assert saved not in proxy.text
    assert token_emulator.handshake_count(tunnel.tunnel_id, "source") == 2


async def test_rotate_on_reject_recovers_a_source_proxy(token_emulator: Emulator) -> None:
    app, app_port = await echo_app()
    tunnel = token_emulator.open_tunnel(services=["SSH"])
    await spend_without_client_token(token_emulator, tunnel.source_token)
    env = dict(AWS_ENV, AWS_ENDPOINT_URL=token_emulator.api_url)
    destination = await ProxyProcess.start(
        "-e", token_emulator.data_url, "-d", f"SSH=127.0.0.1:{app_port}", token=tunnel.destination_token
    )
    source = await ProxyProcess.start(
        "-e", token_emulator.data_url, "-s", "SSH=0", "-b", "127.0.0.1",
        "--tunnel-id", tunnel.tunnel_id, "--rotate-on-reject", "-v", "6",
        token=tunnel.source_token, extra_env=env,
    )
    try:
        port = int((await source.wait_for_line(LISTENING)).group(1))
        await token_emulator.wait_connected(tunnel.tunnel_id, "destination")
        payload = os.urandom(256 * 1024)
        assert await round_trip(port, payload) == payload
        assert await source.stop() == 0
        assert await destination.stop() == 0
    finally:
        await source.kill()
        await destination.kill()
        app.close()
    assert tunnel.tunnel_arn in source.text  # the new token's tunnel ARN is logged...
    rotated = token_emulator.tunnel(tunnel.tunnel_id).tokens["source"].value
    assert rotated != tunnel.source_token
    for secret in (tunnel.source_token, tunnel.destination_token, rotated):
        assert secret not in source.text + destination.text  # ...never a token


@pytest.mark.parametrize("verbosity", ["6", "255"])
async def test_no_token_in_any_log_line_at_trace(token_emulator: Emulator, verbosity: str) -> None:
    app, app_port = await echo_app()
    tunnel = token_emulator.open_tunnel(services=["SSH"])
    common = ("-e", token_emulator.data_url, "-v", verbosity)
    destination = await ProxyProcess.start(
        *common, "-d", f"SSH=127.0.0.1:{app_port}", "-i", CLIENT_A, token=tunnel.destination_token
    )
    source = await ProxyProcess.start(
        *common, "-s", "SSH=0", "-b", "127.0.0.1", "-t", tunnel.source_token, "-i", CLIENT_B,
        token=tunnel.source_token,
    )
    try:
        port = int((await source.wait_for_line(LISTENING)).group(1))
        await token_emulator.wait_connected(tunnel.tunnel_id, "destination")
        assert await round_trip(port, b"x" * 70000) == b"x" * 70000
        assert await source.stop() == 0
        assert await destination.stop() == 0
    finally:
        await source.kill()
        await destination.kill()
        app.close()
    logs = source.text + destination.text
    # The highest verbosity really was on: the upgrade request's headers are logged, redacted.
    assert "> access-token: <redacted>" in logs and "> client-token: <redacted>" in logs
    for secret in (tunnel.source_token, tunnel.destination_token, CLIENT_A, CLIENT_B):
        assert secret not in logs
