"""``python -m localproxy.emulator`` as a program: the JSON line, TLS files, signals, usage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from websockets.asyncio.client import connect

import localproxy

REPO_ROOT = Path(localproxy.__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


_children: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def _kill_leftover_emulators() -> Any:
    """A failing assertion between start() and stop() must not leave an emulator running."""
    yield
    while _children:
        process = _children.pop()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy.emulator", *args,
        cwd=REPO_ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _children.append(process)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if not line:
        _, stderr = await process.communicate()
        pytest.fail(f"the emulator exited ({process.returncode}) without its JSON line: {stderr.decode()}")
    return process, json.loads(line)


async def stop(process: asyncio.subprocess.Process, signum: int) -> tuple[int, str]:
    process.send_signal(signum)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_port_0_prints_the_json_line_serves_and_stops_on_sigterm() -> None:
    process, info = await start("--port", "0")
    assert set(info) == {"api", "data", "ca", "capath", "mqtt"}
    assert info["mqtt"] is None  # no --mqtt: no notify broker
    assert info["api"].startswith("http://127.0.0.1:")
    port = int(info["api"].rsplit(":", 1)[1])
    assert port > 0 and info["data"] == f"ws://127.0.0.1:{port}"
    assert info["ca"] is None and info["capath"] is None

    api = boto3.client(
        "iotsecuretunneling", endpoint_url=info["api"], region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="x",
    )  # fmt: skip
    opened = await asyncio.wait_for(asyncio.to_thread(api.open_tunnel), 10)
    code, stderr = await stop(process, signal.SIGTERM)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "emulator listening" in stderr
    assert opened["sourceAccessToken"] not in stderr  # tokens never reach the log


async def test_tls_writes_the_ca_and_stops_on_sigint(tmp_path: Path) -> None:
    ca_out = tmp_path / "ca"
    process, info = await start("--port", "0", "--tls", "--ca-out", str(ca_out))
    try:
        assert info["api"].startswith("https://127.0.0.1:") and info["data"].startswith("wss://127.0.0.1:")
        assert Path(info["ca"]) == ca_out / "ca.pem" and Path(info["ca"]).is_file()
        assert Path(info["capath"]).is_dir() and len(list(Path(info["capath"]).glob("*.0"))) == 1
        context = ssl.create_default_context(capath=info["capath"])
        api = boto3.client(
            "iotsecuretunneling", endpoint_url=info["api"], region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x", verify=info["ca"],
        )  # fmt: skip
        opened = await asyncio.wait_for(asyncio.to_thread(api.open_tunnel), 10)
        ws = await asyncio.wait_for(
            connect(
                info["data"] + "/tunnel?local-proxy-mode=source",
                additional_headers={"access-token": opened["sourceAccessToken"]},
                subprotocols=["aws.iot.securetunneling-3.0"],  # type: ignore[list-item]
                ssl=context,
            ),
            10,
        )
        assert ws.subprotocol == "aws.iot.securetunneling-3.0"
        await ws.close()
    finally:
        code, stderr = await stop(process, signal.SIGINT)
    assert code == 0, stderr
    assert (ca_out / "ca.pem").is_file()  # a directory we named is kept


async def test_default_ca_dir_is_temporary() -> None:
    process, info = await start("--port", "0", "--tls")
    ca = Path(info["ca"])
    assert ca.is_file()
    code, stderr = await stop(process, signal.SIGTERM)
    assert code == 0, stderr
    assert not ca.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cert", "x.pem"], "--cert and --key go together"),
        (["--port", "70000"], "--port must be within 0..65535"),
        (["--cert", "missing.pem", "--key", "missing.key"], "no such file: missing.pem"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
async def test_usage_errors(args: list[str], message: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy.emulator", *args,
        cwd=REPO_ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2
    assert message in stderr.decode()
    assert stdout == b""


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localproxy.emulator", "--port", str(port),
            cwd=REPO_ROOT, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr.decode()
    assert "Traceback" not in stderr.decode() and stdout == b""
