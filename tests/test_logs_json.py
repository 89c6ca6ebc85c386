"""``--log-format json``: one JSON object per line, structured fields, secrets redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
from typing import Any

from proxyproc import ProxyProcess

from localproxy.ops.logs import REDACTED, log_tunnel, register_secret, setup_logging


def test_json_lines_have_fields_and_redact_secrets() -> None:
    stream = io.StringIO()
    token = "AQGAAXi" + secrets.token_urlsafe(40) + '"\\/'  # JSON escaping must not disguise it
    register_secret(token)
    setup_logging(6, stream=stream, log_format="json")
    logger = logging.getLogger("localproxy.test")
    logger.info("connecting with %s", token, extra={"service": "SSH", "connection": 3})
    context_token = log_tunnel.set("tunnel-1")
    try:
        logger.warning("plain")
    finally:
        log_tunnel.reset(context_token)
    try:
        raise ValueError(token)
    except ValueError:
        logger.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    first = records[0]
    assert set(first) == {"ts", "level", "pid", "logger", "message", "service", "connection"}
    assert first["level"] == "info" and first["pid"] == os.getpid() and first["logger"] == "localproxy.test"
    assert first["message"] == f"connecting with {REDACTED}"
    assert (first["service"], first["connection"]) == ("SSH", 3)
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert records[1]["tunnel"] == "tunnel-1" and records[1]["level"] == "warning"
    assert "ValueError" in records[2]["exception"]
    assert token not in stream.getvalue() and json.dumps(token)[1:-1] not in stream.getvalue()


async def test_cli_json_logs_at_trace_never_hold_the_token(emulator: Any) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    token = tunnel.destination_token
    child = await ProxyProcess.start(
        "-e", emulator.data_url, "-d", "SSH=127.0.0.1:9", "-v", "6", "--log-format", "json",
        "--tunnel-id", tunnel.tunnel_id, "-t", token,
    )
    try:
        await child.wait_for_line("Successfully established websocket connection")
        await emulator.wait_connected(tunnel.tunnel_id, "destination")
    finally:
        assert await asyncio.wait_for(child.stop(), 15) == 0
    assert child.lines and token not in child.text
    records = [json.loads(line) for line in child.lines]  # every line is one JSON object
    assert {"debug", "info", "warning"} <= {record["level"] for record in records}  # -t warns
    # At -v 6 websockets logs the upgrade request, access-token header included: masked.
    headers = [r for r in records if r["logger"].startswith("websockets") and "access-token:" in r["message"].lower()]
    assert headers and all(REDACTED in r["message"] for r in headers)
    connected = [r for r in records if r["message"].startswith("Successfully established websocket")]
    assert connected and connected[0]["tunnel"] == tunnel.tunnel_id
