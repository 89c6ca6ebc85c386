"""OpenSSH's ``ssh`` with ``ProxyCommand='python -m localproxy --stdio SSH ...'``.

Through the emulator to an asyncssh server behind a destination LocalProxy;
skipped where no ``ssh`` client is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from localproxy import DestinationTarget, LocalProxy, Mode, ProxyConfig, ServiceEndpoint
from localproxy.settings import Settings

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None or sys.platform == "win32", reason="needs OpenSSH's ssh client")

TIMEOUT = 30.0


class _OpenServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: the test is about the transport


async def _run(process: asyncssh.SSHServerProcess[str]) -> None:
    process.stdout.write(f"remote ran: {process.command}\n")
    process.exit(0)


@contextlib.asynccontextmanager
async def device(emulator: Any) -> AsyncIterator[Any]:
    """An SSH server and a connected destination proxy in front of it; yields the tunnel."""
    server = await asyncssh.create_server(
        _OpenServer, "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        process_factory=_run,
    )  # fmt: skip
    tunnel = emulator.open_tunnel(services=["SSH"])
    config = ProxyConfig(
        Mode.DESTINATION, tunnel.destination_token, ServiceEndpoint.parse(emulator.data_url),
        services={"SSH": DestinationTarget("127.0.0.1", server.sockets[0].getsockname()[1])},
        settings=Settings(retry_delay_ms=50),
    )  # fmt: skip
    try:
        async with LocalProxy(config):
            await emulator.wait_connected(tunnel.tunnel_id, "destination", TIMEOUT)
            yield tunnel
    finally:
        server.close()


async def ssh(emulator: Any, token: str, token_file: Path, command: str) -> tuple[int, str, str]:
    proxy_command = " ".join(
        shlex.quote(part)
        for part in (sys.executable, "-m", "localproxy", "-e", emulator.data_url, "--stdio", "SSH",
                     "--client-token-file", str(token_file))
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
    assert SSH is not None
    process = await asyncio.create_subprocess_exec(
        SSH, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", f"ProxyCommand={proxy_command}",
        "tester@device-42", command,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode(errors="replace")


async def test_openssh_proxycommand_runs_a_remote_command_twice(tunneling_service: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "client-token"
    async with device(tunneling_service) as tunnel:
        for attempt in range(2):  # the second run reuses the access token (same client token)
            code, out, err = await ssh(tunneling_service, tunnel.source_token, token_file, f"echo {attempt}")
            assert (code, out) == (0, f"remote ran: echo {attempt}\n"), err
            assert "Traceback" not in err
