"""Issue 22, item 9: the side services under hostile clients, over real loopback sockets.

The metrics endpoint (threads, header timeout, connection cap), ``-b`` on a
non-loopback address, the agent's notification handling (JSON depth, which
tokens it masks and for how long) and the emulator's control API (pipelining
without reading, deep JSON, ``Content-Length: 0_2``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
from pathlib import Path
from typing import Any

import pytest
from proxyproc import ProxyProcess

from localproxy.config.command_line import parse_command_line
from localproxy.ops.http_server import (
    MAX_REQUEST_HEAD,
    BoundedHttpServer,
    listening_socket,
)
from localproxy.ops.logs import (
    REDACTED,
    forget_secrets,
    redact,
    registered_secret_count,
)
from localproxy.ops.metrics import MetricsServer

TIMEOUT = 10.0
TOKEN = "AQGAAXj-hostile-services-token-c2VjcmV0"
IDLE_CONNECTIONS = 94  # the measurement: 94 idle connections held 100 threads


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def http_get(port: int, path: str = "/metrics", extra: str = "") -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n", 1)[0], body


async def closed_by_server(sockets: list[socket.socket], at_least: int) -> int:
    """How many of ``sockets`` the server closed (EOF or reset), waiting up to TIMEOUT for ``at_least``."""
    loop = asyncio.get_running_loop()
    closed: set[socket.socket] = set()
    deadline = loop.time() + TIMEOUT
    while len(closed) < at_least and loop.time() < deadline:  # bounded by the deadline
        readable, _, _ = await asyncio.to_thread(select.select, [s for s in sockets if s not in closed], [], [], 0.2)
        for sock in readable:
            try:
                if sock.recv(1) == b"":
                    closed.add(sock)
            except ConnectionError:
                closed.add(sock)
    return len(closed)


# --- metrics ------------------------------------------------------------------------

async def test_idle_metrics_connections_hold_no_threads_and_are_capped() -> None:
    """As the issue measured it: the proxy program with --metrics-port, 94 idle connections."""
    child = await ProxyProcess.start("-e", "ws://127.0.0.1:9", "-d", "SSH=22", "--metrics-port", "0", token=TOKEN)
    idle: list[socket.socket] = []
    try:
        port = int((await child.wait_for_line(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1))
        status, body = await http_get(port)  # the server is up and answering
        assert status == "HTTP/1.1 200 OK" and b"localproxy_websocket_connected" in body
        before = threads_of(child.pid)
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        status, body = await http_get(port)  # accepted after every idle one (the backlog is FIFO)
        assert status == "HTTP/1.1 200 OK" and b"localproxy_websocket_connected" in body
        after = threads_of(child.pid)
        assert after <= before, f"{after - before} more threads for {IDLE_CONNECTIONS} idle connections"
        # 16 connections at most: the longest-idle ones were closed to admit newer ones.
        closed = await closed_by_server(idle, IDLE_CONNECTIONS - 16)
        assert closed >= IDLE_CONNECTIONS - 16
        await child.wait_for_line(r"\[warning\] Metrics server: closed an idle connection to admit a new one")
        assert TOKEN not in child.text and "Traceback" not in child.text
    finally:
        for sock in idle:
            sock.close()
        await child.stop()


async def test_metrics_header_timeout_head_limit_and_methods() -> None:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = BoundedHttpServer(sock, lambda path, headers: (200, [], path.encode()), header_timeout=0.5)
    await server.start()
    try:
        # A connection that sends half a head is closed after the header timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        assert 0.4 <= asyncio.get_running_loop().time() - started < TIMEOUT
        writer.close()
        status, _ = await http_get(port, "/x", "X-Big: " + "a" * MAX_REQUEST_HEAD + "\r\n")
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert first.startswith(b"HTTP/1.1 405 ")
        await asyncio.wait_for(reader.readexactly(len(b"Only GET and HEAD\n")), TIMEOUT)
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)  # keep-alive: the next request
        assert second.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 2\r\n" in second
        assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"/a"
        writer.close()
        status, _ = await http_get(port, "/", "Content-Length: 3\r\n")
        assert status == "HTTP/1.1 400 Bad Request"
        assert server.open_connections <= 1
    finally:
        await server.close()


async def test_metrics_server_speaks_openmetrics_and_gzip() -> None:
    metrics = MetricsServer("127.0.0.1", 0, lambda: ([], None))
    metrics.start()
    try:
        status, body = await http_get(metrics.port, "/metrics", "Accept: application/openmetrics-text; version=1.0.0\r\n")
        assert status == "HTTP/1.1 200 OK" and body.rstrip().endswith(b"# EOF")
        status, body = await http_get(metrics.port, "/metrics", "Accept-Encoding: gzip\r\n")
        import gzip

        assert b"localproxy_websocket_connected" in gzip.decompress(body)
        status, _ = await http_get(metrics.port, "/elsewhere")
        assert status == "HTTP/1.1 404 Not Found"
    finally:
        await metrics.close()


# --- -b on a non-loopback address -----------------------------------------------------

@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (["-s", "5555", "-b", "0.0.0.0"], True),
        (["-s", "5555", "-b", "192.0.2.10"], True),
        (["-s", "5555", "-b", "::"], True),
        (["-s", "5555", "-b", "myhost.example"], True),
        (["-s", "5555", "-b", "127.0.0.1"], False),
        (["-s", "5555", "-b", "::1"], False),
        (["-s", "5555", "-b", "localhost"], False),
        (["-s", "5555"], False),
        (["-d", "22", "-b", "0.0.0.0"], False),  # destination: -b is the outgoing address
    ],
)
def test_non_loopback_bind_address_warns_like_k(args: list[str], warned: bool) -> None:
    parsed = parse_command_line(["-e", "ws://127.0.0.1:9", "-t", TOKEN, *args], {})
    warnings = [m for level, m in parsed.log_messages if level == logging.WARNING and "source listeners bind" in m]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].startswith("SECURITY WARNING: the source listeners bind to ")
        assert "(-b/--local-bind-address)" in warnings[0]


def test_default_bind_address_from_settings_warns_too(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"tunneling.proxy.default_bind_address": "0.0.0.0"}))
    parsed = parse_command_line(["-e", "ws://127.0.0.1:9", "-t", TOKEN, "-s", "5555", "--settings-json", str(settings)], {})
    assert any("bind to 0.0.0.0 (tunneling.proxy.default_bind_address)" in m for _, m in parsed.log_messages)


async def test_the_program_logs_the_bind_warning() -> None:
    child = await ProxyProcess.start("-e", "ws://127.0.0.1:9", "-s", "0", "-b", "0.0.0.0", token=TOKEN)
    try:
        await child.wait_for_line(r"\[warning\] SECURITY WARNING: the source listeners bind to 0\.0\.0\.0")
    finally:
        await child.stop()


# --- the agent ------------------------------------------------------------------------

def notification(token: str, services: list[str] | None = None) -> bytes:
    return json.dumps({"clientAccessToken": token, "clientMode": "destination", "region": "us-east-1",
                       "services": services or ["SSH"]}).encode()


async def test_agent_refuses_deep_json_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("aiomqtt", reason="needs the mqtt extra")
    from localproxy.agent import DeviceAgent
    from localproxy.agent.notify import InvalidNotification, parse_notification
    from localproxy.types import DestinationTarget

    deep = b'{"clientAccessToken": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(InvalidNotification, match="payload refused: nested deeper than 8 levels"):
        parse_notification(deep)
    caplog.set_level(logging.INFO, "localproxy")
    async with DeviceAgent("deep-thing", None, {"SSH": DestinationTarget("127.0.0.1", 22)},
                           endpoint="ws://127.0.0.1:9") as agent:
        await agent.handle_notification(deep)
        await agent.handle_notification(b"[" * 100_000)
        assert agent.tunnels == {}
    rejected = [r for r in caplog.records if "Rejected a tunnel notification" in r.getMessage()]
    assert len(rejected) == 2 and all(r.exc_info is None for r in rejected)
    assert not any(r.exc_info for r in caplog.records)


async def test_agent_masks_only_accepted_tokens_and_forgets_replaced_ones() -> None:
    pytest.importorskip("aiomqtt", reason="needs the mqtt extra")
    from localproxy.agent import DeviceAgent
    from localproxy.types import DestinationTarget

    forget_secrets()
    async with DeviceAgent("mask-thing", None, {"SSH": DestinationTarget("127.0.0.1", 22)},
                           endpoint="ws://127.0.0.1:9", max_tunnels=2) as agent:
        # Refused notifications (a service it does not serve): never registered.
        for index in range(500):
            await agent.handle_notification(notification(f"{TOKEN}-refused-{index}", ["VNC"]))
        assert registered_secret_count() == 0
        assert redact(f"{TOKEN}-refused-7") == f"{TOKEN}-refused-7"
        # 50 rotations of one tunnel: each token replaces (revokes) the previous one.
        for index in range(50):
            await agent.handle_notification(notification(f"{TOKEN}-rotation-{index}"))
            assert redact(f"{TOKEN}-rotation-{index}") == REDACTED  # masked while in use
        assert len(agent.tunnels) == 1
        assert registered_secret_count() <= 2  # the current access token and its client token
        assert redact(f"{TOKEN}-rotation-48") != REDACTED  # replaced: forgotten
        proxy = next(iter(agent._proxies.values()))
        assert redact(proxy.config.client_token or "") == REDACTED
    assert registered_secret_count() == 0  # the agent stopped its proxies: nothing left to mask


# --- the emulator's control API ---------------------------------------------------------

async def api_exchange(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    finally:
        writer.close()
    return head.decode("latin-1").split("\r\n", 1)[0], body


def api_request(body: bytes, content_length: str | None = None, operation: str = "ListTunnels") -> bytes:
    return (
        f"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: IoTSecuredTunneling.{operation}\r\n"
        f"Content-Type: application/x-amz-json-1.1\r\nContent-Length: {content_length or len(body)}\r\n\r\n"
    ).encode() + body


async def test_emulator_refuses_odd_content_length_and_deep_json(emulator: Any) -> None:
    for length in ("0_2", "+2", " 2x", "9" * 40):
        status, body = await api_exchange(emulator.port, api_request(b"{}", length))
        assert status == "HTTP/1.1 400 Bad Request" and body == b"Invalid Content-Length", length
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = await api_exchange(emulator.port, api_request(deep))
    assert status == "HTTP/1.1 400 Bad Request"
    error = json.loads(body)
    assert error["__type"] == "SerializationException" and "nested deeper than 32 levels" in error["message"]
    status, body = await api_exchange(emulator.port, api_request(b"{}"))  # and it still serves
    assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"tunnelSummaries": []}


async def test_emulator_stops_reading_a_pipelining_client_that_never_reads(emulator: Any) -> None:
    request = api_request(b'{"tunnelId": "00000000-0000-0000-0000-000000000000"}', operation="DescribeTunnel")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's own window stays small
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", emulator.port))
    sent_requests = 0
    chunk = request * 100
    try:
        for _ in range(4000):  # at most 400,000 requests (about 90 MB), or until the server stops reading
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 1.0)
            except TimeoutError:
                break  # our send buffer is full: the emulator stopped reading us
            sent_requests += 100
        else:
            raise AssertionError("the emulator kept reading a client that never reads its answers")
        connections = [c for c in emulator.front.unrouted if c.transport.get_write_buffer_size() > 0]
        assert len(connections) == 1
        buffered = connections[0].transport.get_write_buffer_size()
        assert buffered < 512 * 1024, f"{buffered} bytes of answers buffered"
        # Nothing lost: reading now, the answers to every request that got through come.
        answers = 0
        received = b""
        while answers < sent_requests:  # bounded by the wait_for below
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), TIMEOUT)
            assert data, f"the emulator closed after {answers} of {sent_requests} answers"
            received += data
            answers += received.count(b"HTTP/1.1 400 ")
            received = received[received.rfind(b"HTTP/1.1 400 ") + 1:] if b"HTTP/1.1 400 " in received else received
        assert answers >= sent_requests
    finally:
        sock.close()
