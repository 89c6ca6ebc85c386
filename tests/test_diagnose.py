"""localproxy.diagnose: the report for each tunnel state, and the program against the emulator."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from localproxy.diagnose import report

NOW = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)


def tunnel(status: str = "OPEN", source: str = "CONNECTED", destination: str = "CONNECTED",
           thing: str | None = "RemoteThing1") -> dict[str, Any]:
    return {
        "tunnelId": "tid-1",
        "tunnelArn": "arn:aws:iot:us-east-1:123456789012:tunnel/tid-1",
        "status": status,
        "sourceConnectionState": {"status": source, "lastUpdatedAt": NOW - datetime.timedelta(seconds=90)},
        "destinationConnectionState": {"status": destination,
                                       "lastUpdatedAt": (NOW - datetime.timedelta(hours=2)).timestamp()},
        "destinationConfig": {"services": ["SSH"], **({"thingName": thing} if thing else {})},
        "createdAt": NOW - datetime.timedelta(hours=4),
        "timeoutConfig": {"maxLifetimeTimeoutMinutes": 720},
    }


def test_report_destination_disconnected() -> None:
    text = report(tunnel(destination="DISCONNECTED"), region="us-east-1", now=NOW)
    assert "source:      CONNECTED for 1m 30s" in text
    assert "destination: DISCONNECTED for 2h 00m" in text
    assert "time left:   8h 00m of 720 min" in text
    assert ("aws iotsecuretunneling rotate-tunnel-access-token --tunnel-id tid-1 --client-mode DESTINATION "
            "--destination-config thingName=RemoteThing1,services=SSH --region us-east-1") in text
    assert "$aws/things/RemoteThing1/tunnels/notify" in text
    assert "--client-mode SOURCE" not in text


def test_report_destination_disconnected_without_thing() -> None:
    text = report(tunnel(destination="DISCONNECTED", thing=None), region="us-east-1", now=NOW)
    assert "thingName=<thing-name>,services=SSH" in text
    assert "by hand" in text and "notify" not in text


def test_report_source_disconnected() -> None:
    text = report(tunnel(source="DISCONNECTED"), region="eu-west-1", now=NOW)
    assert "--tunnel-id tid-1 --client-mode SOURCE --region eu-west-1" in text
    assert "export AWSIOT_TUNNEL_ACCESS_TOKEN=" in text
    assert "DESTINATION" not in text


def test_report_healthy_and_closed() -> None:
    assert "healthy" in report(tunnel(), region="us-east-1", now=NOW)
    closed = report(tunnel(status="CLOSED"), region="us-east-1", now=NOW + datetime.timedelta(hours=9))
    assert "CLOSED" in closed and "open-tunnel" in closed and "rotate" not in closed
    assert "(expired)" in closed


# --- the program, against the emulator --------------------------------------------


def fake_aws_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="fake-secret", AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(extra)
    return env


async def run_diagnose(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy.diagnose", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except asyncio.TimeoutError:
        process.kill()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def session_diag_emulator() -> AsyncIterator[Any]:
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0, region="us-east-1") as emulator:
        yield emulator


async def test_diagnose_open_tunnel_with_disconnected_destination(session_diag_emulator: Any, tmp_path: Path) -> None:
    emulator = session_diag_emulator
    opened = emulator.open_tunnel(services=["SSH"], thing_name="RemoteThing1")
    env = fake_aws_env(tmp_path, AWS_ENDPOINT_URL=emulator.api_url)
    code, out, err = await run_diagnose(env, "--tunnel-id", opened.tunnel_id)
    assert (code, err) == (0, "")
    assert f"Tunnel {opened.tunnel_id} ({opened.tunnel_arn})" in out
    assert "status:      OPEN" in out
    assert "destination: DISCONNECTED for" in out
    assert "time left:   11h 59m of 720 min" in out or "time left:   12h 00m of 720 min" in out
    assert (f"rotate-tunnel-access-token --tunnel-id {opened.tunnel_id} --client-mode DESTINATION "
            "--destination-config thingName=RemoteThing1,services=SSH --region us-east-1") in out
    assert "$aws/things/RemoteThing1/tunnels/notify" in out


async def test_diagnose_endpoint_url_option_and_not_found(session_diag_emulator: Any, tmp_path: Path) -> None:
    env = fake_aws_env(tmp_path)
    code, out, err = await run_diagnose(
        env, "--tunnel-id", "no-such-tunnel", "--endpoint-url", session_diag_emulator.api_url
    )
    assert code == 1 and out == ""
    assert "Tunnel no-such-tunnel not found" in err and "Traceback" not in err


async def test_diagnose_without_credentials(session_diag_emulator: Any, tmp_path: Path) -> None:
    env = fake_aws_env(tmp_path, AWS_ENDPOINT_URL=session_diag_emulator.api_url)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    code, _, err = await run_diagnose(env, "--tunnel-id", "x")
    assert code == 1 and "No AWS credentials" in err and "Traceback" not in err


async def test_diagnose_unreachable_endpoint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = await run_diagnose(fake_aws_env(tmp_path), "--tunnel-id", "x",
                                      "--endpoint-url", f"http://127.0.0.1:{port}")
    assert code == 1 and "Cannot reach" in err and "Traceback" not in err
