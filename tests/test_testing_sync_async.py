"""The plugin's fixtures in ``def`` and ``async def`` tests alike (issue 21), through ``pytester``.

Each generated file uses every fixture (``tunneling_service``, ``tunneling_service_tls``,
``tunnel_pair`` in-process and as processes, ``tunneling_client``) and calls boto3
directly, in a fresh pytest process: the sync file with and without pytest-asyncio
loaded, the async file in strict mode (marked) and auto mode (unmarked). A failing
``def`` test still stops every process, port and thread.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

pytest_plugins = ["pytester"]

HELPERS = '''
import socket
import threading


def echo_app():
    """A blocking TCP echo server on a thread (what a sync rig has): its socket and port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def roundtrip(pair, data, service="SSH"):
    with pair.connect(service) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            got += chunk
    return got


def tls_client(service):
    import boto3

    return boto3.client(
        "iotsecuretunneling", endpoint_url=service.api_url, region_name=service.region,
        aws_access_key_id="x", aws_secret_access_key="x", verify=str(service.ca_pem_path),
    )
'''

SYNC_TESTS = '''
from helpers import echo_app, roundtrip, tls_client


def test_every_fixture_in_a_def_test(tunneling_service, tunneling_service_tls, tunnel_pair, tunneling_client):
    app, port = echo_app()
    pair = tunnel_pair({"SSH": port, "WEB": f"127.0.0.1:{port}"})
    assert set(pair.source_ports) == {"SSH", "WEB"}
    assert roundtrip(pair, b"ssh bytes") == b"ssh bytes"
    assert roundtrip(pair, b"web bytes", "WEB") == b"web bytes"
    described = tunneling_client.describe_tunnel(tunnelId=pair.tunnel_id)["tunnel"]
    assert described["destinationConfig"]["services"] == ["SSH", "WEB"]
    assert described["sourceConnectionState"]["status"] == "CONNECTED"

    opened = tunneling_service.open_tunnel(services=["VNC"])
    listed = tunneling_client.list_tunnels()["tunnelSummaries"]
    assert {t["tunnelId"] for t in listed} == {pair.tunnel_id, opened.tunnel_id}

    # Fault hooks from a def test: each blocks until done.
    tunneling_service.fail_next_handshakes(2)
    mark = tunneling_service.event_mark()
    tunneling_service.drop(pair.tunnel_id, "source")
    rejected = tunneling_service.wait_event("handshake_rejected", since=mark, timeout=15)
    assert rejected.kind == "handshake_rejected"
    tunneling_service.wait_connected(pair.tunnel_id, "source", timeout=15)
    assert roundtrip(pair, b"after the drop") == b"after the drop"
    tunneling_service.set_bandwidth(None)

    children = tunnel_pair({"SSH": port}, processes=True, service=tunneling_service_tls)
    assert roundtrip(children, b"over wss") == b"over wss"
    assert tls_client(tunneling_service_tls).describe_tunnel(tunnelId=children.tunnel_id)["tunnel"]["status"] == "OPEN"
    children.close()
    assert children.source.process.returncode is not None

    tunneling_service.advance_time(13 * 3600)  # past the 12 h lifetime: the tunnels close
    tunneling_service.wait_disconnected(pair.tunnel_id, "destination", timeout=15)
    assert tunneling_client.describe_tunnel(tunnelId=pair.tunnel_id)["tunnel"]["status"] == "CLOSED"
    pair.close()
    pair.close()  # again: nothing left to stop
    app.close()
'''

ASYNC_TESTS = '''
import asyncio

import pytest

from helpers import tls_client

MARK


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def roundtrip(pair, data, service="SSH"):
    reader, writer = await asyncio.open_connection(pair.source_host, pair.source_ports[service])
    writer.write(data)
    got = await asyncio.wait_for(reader.readexactly(len(data)), 15)
    writer.close()
    return got


async def test_every_fixture_in_an_async_test(tunneling_service, tunneling_service_tls, tunnel_pair, tunneling_client):
    app = await asyncio.start_server(echo, "127.0.0.1", 0)  # on the test's own loop
    port = app.sockets[0].getsockname()[1]
    pair = await tunnel_pair({"SSH": port, "WEB": f"127.0.0.1:{port}"})
    assert await roundtrip(pair, b"ssh bytes") == b"ssh bytes"
    # boto3 directly, blocking this loop: the emulator runs on its own.
    described = tunneling_client.describe_tunnel(tunnelId=pair.tunnel_id)["tunnel"]
    assert described["sourceConnectionState"]["status"] == "CONNECTED"

    opened = await tunneling_service.open_tunnel(services=["VNC"])  # awaited, as documented
    plain = tunneling_service.open_tunnel(services=["RDP"])  # or not
    listed = {t["tunnelId"] for t in tunneling_client.list_tunnels()["tunnelSummaries"]}
    assert listed == {pair.tunnel_id, opened.tunnel_id, plain.tunnel_id}

    tunneling_service.fail_next_handshakes(2)
    mark = tunneling_service.event_mark()
    await tunneling_service.drop(pair.tunnel_id, "source")
    await tunneling_service.wait_event("handshake_rejected", since=mark, timeout=15)
    await tunneling_service.wait_connected(pair.tunnel_id, "source", timeout=15)
    assert await roundtrip(pair, b"after the drop") == b"after the drop"

    children = await tunnel_pair({"SSH": port}, processes=True, service=tunneling_service_tls)
    assert await roundtrip(children, b"over wss") == b"over wss"
    assert tls_client(tunneling_service_tls).describe_tunnel(tunnelId=children.tunnel_id)["tunnel"]["status"] == "OPEN"
    await children.close()

    tunneling_service.advance_time(13 * 3600)
    await tunneling_service.wait_disconnected(pair.tunnel_id, "destination", timeout=15)
    assert tunneling_client.describe_tunnel(tunnelId=pair.tunnel_id)["tunnel"]["status"] == "CLOSED"
    await pair.close()
    app.close()
'''

FAILING_SYNC_TEST = '''
import json
import threading

from helpers import echo_app


def test_fails_midway(tunnel_pair, tunneling_service, tunneling_service_tls):
    app, port = echo_app()
    in_process = tunnel_pair({"SSH": port})
    children = tunnel_pair({"SSH": port}, processes=True, service=tunneling_service_tls)
    record = {
        "pids": [children.source.pid, children.destination.pid],
        "ports": [tunneling_service.port, tunneling_service_tls.port,
                  *in_process.source_ports.values(), *children.source_ports.values()],
    }
    with open("started.json", "w") as out:
        json.dump(record, out)
    assert False, "the device under test misbehaved"


def test_no_thread_left_behind():
    left = [t.name for t in threading.enumerate() if t.name.startswith("localproxy-")]
    assert left == []
'''


def run_generated(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    options = ["-o", f"asyncio_mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function"]
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *options, *args, timeout=90)


@pytest.mark.parametrize("asyncio_plugin", ["loaded", "absent"])
def test_def_test_uses_every_fixture(pytester: pytest.Pytester, asyncio_plugin: str) -> None:
    pytester.makepyfile(helpers=HELPERS, test_sync=SYNC_TESTS)
    args = ("-p", "no:asyncio") if asyncio_plugin == "absent" else ()
    result = run_generated(pytester, "strict", *args)
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_async_test_uses_every_fixture(pytester: pytest.Pytester, mode: str) -> None:
    mark = "pytestmark = pytest.mark.asyncio" if mode == "strict" else ""
    pytester.makepyfile(helpers=HELPERS, test_async=ASYNC_TESTS.replace("MARK", mark))
    result = run_generated(pytester, mode, "-W", "error::pytest.PytestUnraisableExceptionWarning")
    result.assert_outcomes(passed=1)


def test_failing_def_test_still_tears_everything_down(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(helpers=HELPERS, test_failing=FAILING_SYNC_TEST)
    result = run_generated(pytester, "strict")
    result.assert_outcomes(failed=1, passed=1)  # the second: no emulator or pair thread is left
    result.stdout.fnmatch_lines(["*the device under test misbehaved*"])
    record = json.loads((pytester.path / "started.json").read_text())
    assert len(record["pids"]) == 2 and len(record["ports"]) == 4
    for pid in record["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for port in record["ports"]:
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
