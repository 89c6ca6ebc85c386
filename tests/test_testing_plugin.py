"""The pytest plugin ``localproxy.testing``: its fixtures used directly, and through ``pytester``.

Our own suite runs with the plugin loaded by its ``pytest11`` entry point, so the
first tests use the fixtures as any project would; the ``pytester`` tests run
generated test files in a fresh pytest process (strict and auto mode) and check
that a failing test still stops every proxy process and closes every port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localproxy.testing.pair import TunnelPair
from localproxy.testing.processes import ProxyProcess, echo_app

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 15


async def echo_roundtrip(pair: TunnelPair, service: str, data: bytes) -> bytes:
    """``data`` sent to the source's port of ``service`` and echoed back by the app."""
    reader, writer = await pair.open_connection(service)
    writer.write(data)
    echoed = await asyncio.wait_for(reader.readexactly(len(data)), TIMEOUT)
    writer.close()
    return echoed


# --- the fixtures, used directly -------------------------------------------------------


async def test_in_process_pair_two_services(tunnel_pair: Any, tunneling_client: Any) -> None:
    app, port = await echo_app()
    try:
        pair = await tunnel_pair({"SSH": port, "WEB": f"127.0.0.1:{port}"})
        assert set(pair.source_ports) == {"SSH", "WEB"}
        assert await echo_roundtrip(pair, "SSH", b"ssh bytes") == b"ssh bytes"
        assert await echo_roundtrip(pair, "WEB", b"web bytes") == b"web bytes"
        described = await asyncio.wait_for(
            asyncio.to_thread(tunneling_client.describe_tunnel, tunnelId=pair.tunnel_id), TIMEOUT
        )
        assert described["tunnel"]["destinationConfig"]["services"] == ["SSH", "WEB"]
        assert described["tunnel"]["sourceConnectionState"]["status"] == "CONNECTED"
        await pair.close()
        await pair.close()  # again: nothing left to stop
        with pytest.raises(OSError):
            await asyncio.open_connection(pair.source_host, pair.source_ports["SSH"])
    finally:
        app.close()


async def test_fault_hooks_reach_the_pair(tunnel_pair: Any, tunneling_service: Any) -> None:
    app, port = await echo_app()
    try:
        pair = await tunnel_pair({"SSH": port})
        tunneling_service.fail_next_handshakes(2)
        mark = tunneling_service.event_mark()
        await tunneling_service.drop(pair.tunnel_id, "source")
        await tunneling_service.wait_event("handshake_rejected", since=mark, timeout=TIMEOUT)
        await tunneling_service.wait_connected(pair.tunnel_id, "source", timeout=TIMEOUT)
        assert await echo_roundtrip(pair, "SSH", b"after the drop") == b"after the drop"
        tunneling_service.advance_time(13 * 3600)  # past the 12 h lifetime: the tunnel closes
        await tunneling_service.wait_disconnected(pair.tunnel_id, "destination", timeout=TIMEOUT)
        assert tunneling_service.describe(pair.tunnel_id)["status"] == "CLOSED"
    finally:
        app.close()


async def test_tls_pair_as_processes(tunnel_pair: Any, tunneling_service_tls: Any) -> None:
    app, port = await echo_app()
    try:
        pair = await tunnel_pair({"SSH": port}, processes=True, service=tunneling_service_tls)
        assert isinstance(pair.source, ProxyProcess) and isinstance(pair.destination, ProxyProcess)
        assert tunneling_service_tls.data_url.startswith("wss://")
        assert await echo_roundtrip(pair, "SSH", b"over wss") == b"over wss"
        assert any("Successfully established websocket connection" in line for line in pair.source.lines)
        await pair.close()
        assert pair.source.process.returncode is not None and pair.destination.process.returncode is not None
    finally:
        app.close()


async def test_a_pair_needs_services(tunnel_pair: Any) -> None:
    with pytest.raises(ValueError, match="at least one service"):
        await tunnel_pair({})


def test_plugin_import_is_light() -> None:
    """Loading the plugin (every pytest run of a project with localproxy installed) imports
    neither the emulator, the proxy, websockets nor boto3."""
    code = (
        "import sys, localproxy.testing\n"
        "heavy = [m for m in ('localproxy.emulator', 'localproxy.proxy.local_proxy', 'websockets', 'boto3') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- generated test files, in a fresh pytest (pytester) -----------------------------------


def run_generated(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    """pytest in a fresh process on pytester's files, in pytest-asyncio's ``mode``."""
    options = ["-o", f"asyncio_mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function"]
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *options, *args, timeout=60)


def readme_example() -> str:
    """The README's complete example test (the first python block of "Testing with pytest")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Testing with pytest", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_readme_example_passes(pytester: pytest.Pytester, mode: str) -> None:
    example = readme_example()
    assert len(example.splitlines()) == 15
    pytester.makepyfile(test_tunnel=example)
    result = run_generated(pytester, mode, "-W", "error::pytest.PytestUnraisableExceptionWarning")
    result.assert_outcomes(passed=1)


STRICT_WITHOUT_MARK = '''
async def test_unmarked(tunneling_service):
    assert tunneling_service.data_url
'''


def test_strict_mode_needs_the_mark(pytester: pytest.Pytester) -> None:
    """What the README says of strict mode: an unmarked async test is not run (not a silent pass)."""
    pytester.makepyfile(test_unmarked=STRICT_WITHOUT_MARK)
    result = run_generated(pytester, "strict")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0


FAILING_TEST = '''
import asyncio
import json

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()

async def test_fails_midway(tunnel_pair, tunneling_service):
    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    in_process = await tunnel_pair({"SSH": app.sockets[0].getsockname()[1]})
    children = await tunnel_pair({"SSH": app.sockets[0].getsockname()[1]}, processes=True)
    record = {
        "pids": [children.source.pid, children.destination.pid],
        "ports": [tunneling_service.port, *in_process.source_ports.values(), *children.source_ports.values()],
    }
    with open("started.json", "w") as out:
        json.dump(record, out)
    assert False, "the device under test misbehaved"
'''


def test_failing_test_still_tears_everything_down(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_failing=FAILING_TEST)
    result = run_generated(pytester, "auto")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the device under test misbehaved*"])
    record = json.loads((pytester.path / "started.json").read_text())
    assert len(record["pids"]) == 2 and len(record["ports"]) == 3
    # Left running, the proxies would retry forever; teardown stopped (and reaped) them.
    for pid in record["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for port in record["ports"]:
        with pytest.raises(ConnectionRefusedError):
            socket_connect("127.0.0.1", port)


def socket_connect(host: str, port: int) -> None:
    import socket

    with socket.create_connection((host, port), timeout=5):
        pass


WITHOUT_BOTO3_CONFTEST = '''
import sys

sys.modules["boto3"] = None  # as if boto3 were not installed
'''

WITHOUT_BOTO3_TESTS = '''
async def test_service_needs_no_boto3(tunneling_service):
    assert tunneling_service.open_tunnel(services=["SSH"]).tunnel_id

def test_client_needs_boto3(tunneling_client):
    pass
'''


def test_missing_boto3_fails_only_the_client(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(WITHOUT_BOTO3_CONFTEST)
    pytester.makepyfile(test_no_boto3=WITHOUT_BOTO3_TESTS)
    result = run_generated(pytester, "auto")
    result.assert_outcomes(passed=1, errors=1)
    assert "the tunneling_client fixture needs boto3" in result.stdout.str()
    assert "pip install 'localproxy[testing]'" in result.stdout.str()
    assert "During handling" not in result.stdout.str()  # the hint alone, not a chained traceback


def test_sync_tests_need_no_pytest_asyncio(tmp_path: Path) -> None:
    """The fixtures are plain pytest fixtures (their loops run on threads of their own): a
    ``def`` test uses them with pytest-asyncio absent."""
    # A pytest_asyncio that cannot be imported, first on the path: as if it were not installed.
    shadow = tmp_path / "shadow" / "pytest_asyncio"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named pytest_asyncio')\n")
    (tmp_path / "test_no_asyncio.py").write_text(
        "import sys\n\n"
        "def test_service(tunneling_service, tunnel_pair):\n"
        "    assert 'pytest_asyncio' not in sys.modules\n"
        "    pair = tunnel_pair({'SSH': tunneling_service.port})\n"
        "    assert tunneling_service.describe(pair.tunnel_id)['status'] == 'OPEN'\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:asyncio", "-p", "no:cacheprovider", "-q", "test_no_asyncio.py"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(shadow.parent)),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
