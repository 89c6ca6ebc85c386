"""The tunnel's end while data flows: CloseTunnel and lifetime expiry make both proxy
processes exit with their documented non-zero code (``localproxy.errors.ExitCode``),
an explanation and no traceback; the local connections are closed, not left hanging.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from localproxy.errors import ExitCode

TIMEOUT = 10.0


@pytest.mark.parametrize("how", ["close", "expire"])
async def test_tunnel_end_exits_both_proxies_with_their_code(emulator: Any, rel_kit: Any, rel_processes: Any,
                                                             tmp_path: Path, how: str) -> None:
    settings = tmp_path / "settings.json"  # reconnect after 50 ms instead of 2.5 s
    settings.write_text(json.dumps({"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "50"}}}}))
    app = await rel_kit.App("echo").start()
    tunnel = emulator.open_tunnel(services=["SSH"], lifetime_minutes=5)
    destination = await rel_processes("-e", emulator.data_url, "--settings-json", str(settings), "-d", f"SSH=127.0.0.1:{app.port}",
                                      env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token})
    source = await rel_processes("-e", emulator.data_url, "--settings-json", str(settings), "-s", "SSH=0", "-b", "127.0.0.1",
                                 env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token})
    port = int((await source.wait_for_line(r"Listening for new connection on port (\d+)")).group(1))
    await emulator.wait_connected(tunnel.tunnel_id, "destination")
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"

    if how == "close":
        emulator.close_tunnel(tunnel.tunnel_id)
    else:
        emulator.advance_time(5 * 60 + 1)
    assert emulator.describe(tunnel.tunnel_id)["status"] == "CLOSED"

    codes = await asyncio.gather(source.wait(), destination.wait())
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the client is told: closed
    await asyncio.wait_for(app.closed[0], TIMEOUT)
    writer.close()
    for code, process in zip(codes, (source, destination)):
        assert code == ExitCode.TUNNEL_CLOSED, f"exit {code}:\n{process.text}"
        assert "Traceback" not in process.text
        assert "closed" in process.text.lower()
        assert tunnel.source_token not in process.text and tunnel.destination_token not in process.text
    await app.close()
