"""Issue 14: proxy stats, the Prometheus exporter and the CLI flags, against real sockets and the emulator."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from localproxy.cli import main as proxy_main
from localproxy.config.command_line import parse_command_line
from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    ConfigError,
    ExitCode,
)
from localproxy.ops.metrics import MISSING_LIBRARY, MetricsServer
from localproxy.ops.operations import Operations, OpsOptions
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import V3
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint
from localproxy.wire.codec import Message, MessageType, encode_frame

TIMEOUT = 10
CLIENT_TOKENS = ("a" * 32 + "-source-client-token", "b" * 32 + "-destination-client-token")


def samples(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Exposition text -> {(sample name, labels): value} (prometheus_client's own parser)."""
    found = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[name, frozenset(labels.items())]


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
            return reply.read().decode()

    return await asyncio.to_thread(get)  # the exporter hops into this loop: do not block it


async def until(check: Any, what: str) -> None:
    """Bounded poll for counters that have no event of their own (at most 10 s)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_stats_count_bytes_and_connections_per_service(emulator: Any, rel_pair_factory: Any, rel_kit: Any) -> None:
    app = await rel_kit.App("echo").start()
    try:
        pair = await rel_pair_factory(emulator, {"SSH": app})
        await pair.wait_serving()
        reader, writer = await pair.connect()
        payload = bytes(range(256)) * 400  # 102400 bytes, several DATA frames
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
        src, dst = pair.src.stats(), pair.dst.stats()
        assert src.bytes_sent["SSH"] == dst.bytes_received["SSH"] == len(payload)
        assert dst.bytes_sent["SSH"] == src.bytes_received["SSH"] == len(payload)
        assert src.active_connections == {"SSH": 1} and dst.active_connections == {"SSH": 1}
        assert src.connections["SSH"] == dst.connections["SSH"] == 1
        assert (src.mode, src.connected, src.sessions, src.reconnects) == ("source", True, 1, 0)
        assert src.services == ("SSH",)
        writer.close()
        await until(lambda: not pair.dst.stats().active_connections, "the destination to close its connection")
        assert pair.dst.stats().connections["SSH"] == 1
    finally:
        await app.close()


async def test_reconnects_and_ping_rtt(emulator: Any, rel_pair_factory: Any, rel_kit: Any) -> None:
    app = await rel_kit.App("echo").start()
    try:
        pair = await rel_pair_factory(emulator, {"SSH": app}, source_kw={"settings": rel_kit.settings(ping_period_ms=20)})
        await until(lambda: pair.src.stats().ping_rtt is not None, "a ping answered")
        assert 0 < pair.src.stats().ping_rtt < TIMEOUT  # type: ignore[operator]
        reconnected = asyncio.Event()
        pair.src.subscribe(lambda e: reconnected.set() if pair.src.stats().sessions == 2 else None)
        await emulator.drop(pair.tunnel.tunnel_id, "source")
        await asyncio.wait_for(reconnected.wait(), TIMEOUT)
        stats = pair.src.stats()
        assert (stats.sessions, stats.reconnects, stats.connected) == (2, 1, True)
    finally:
        await app.close()


async def test_frames_dropped_by_rule_on_the_wire(emulator: Any, rel_pair_factory: Any, rel_kit: Any) -> None:
    app = await rel_kit.App("echo").start()
    try:
        pair = await rel_pair_factory(emulator, {"SSH": app})
        await pair.wait_serving()
        stale = encode_frame(Message(type=MessageType.DATA, stream_id=99, service_id="SSH", payload=b"x"))
        unknown = encode_frame(Message(type=MessageType.DATA, stream_id=1, service_id="NOPE", payload=b"x"))
        await emulator.inject_raw(pair.tunnel.tunnel_id, "source", stale + unknown)
        await until(lambda: len(pair.src.stats().frames_dropped) == 2, "two dropped frames")
        assert pair.src.stats().frames_dropped == {"stale_stream": 1, "unknown_service": 1}
        assert await pair.echo_roundtrip(b"still serving") == b"still serving"
    finally:
        await app.close()


def _destination(emulator: Any, token: str, settings: Any, client_token: str | None = None) -> LocalProxy:
    config = ProxyConfig(mode=Mode.DESTINATION, access_token=token, endpoint=ServiceEndpoint.parse(emulator.data_url),
                         services={"SSH": DestinationTarget("127.0.0.1", 9)}, settings=settings,
                         client_token=client_token)
    return LocalProxy(config)


async def _fails(proxy: LocalProxy) -> BaseException:
    async with proxy:
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(proxy.wait_closed(), TIMEOUT)
    return caught.value


async def _spend(emulator: Any, token: str) -> None:
    """Connect once without a client token, as a tool that sends none would: the token is spent."""
    url = f"{emulator.data_url}/tunnel?local-proxy-mode=destination"
    async with connect(url, additional_headers={"access-token": token}, subprotocols=[Subprotocol(V3)]):
        pass


async def test_handshake_refusals_by_class(emulator: Any, rel_kit: Any) -> None:
    settings = rel_kit.settings()
    tunnel = emulator.open_tunnel(services=["SSH"])
    emulator.fail_next_handshakes(2, status=503)
    first = _destination(emulator, tunnel.destination_token, settings, CLIENT_TOKENS[0])
    async with first:
        await asyncio.wait_for(first.ready, TIMEOUT)
        assert first.stats().handshake_refusals["5xx"] == 2
    mismatch = _destination(emulator, tunnel.destination_token, settings, CLIENT_TOKENS[1])
    assert isinstance(await _fails(mismatch), ClientTokenMismatchError)
    assert mismatch.stats().handshake_refusals == {
        "used_token": 0, "client_token_mismatch": 1, "other_4xx": 0, "5xx": 0
    }

    spent = emulator.open_tunnel(services=["SSH"])
    await _spend(emulator, spent.destination_token)
    used = _destination(emulator, spent.destination_token, settings)
    assert isinstance(await _fails(used), AccessTokenUsedError)
    assert used.stats().handshake_refusals["used_token"] == 1

    bogus = _destination(emulator, "not-a-token-the-service-issued", settings)
    await _fails(bogus)
    assert bogus.stats().handshake_refusals["other_4xx"] == 1
    assert sum(bogus.stats().handshake_refusals.values()) == 1


async def test_metrics_scrape_without_tokens(emulator: Any, rel_pair_factory: Any, rel_kit: Any) -> None:
    app = await rel_kit.App("echo").start()
    try:
        pair = await rel_pair_factory(emulator, {"SSH": app}, client_tokens=CLIENT_TOKENS)
        await pair.wait_serving()
        assert await pair.echo_roundtrip(b"x" * 5000) == b"x" * 5000
        await until(lambda: pair.dst.stats().bytes_sent.get("SSH") == 5000, "the echo counted")
        operations = Operations(OpsOptions(0), lambda: ([pair.src.stats(), pair.dst.stats()], None))
        await operations.start()
        try:
            assert operations.metrics_port
            body = await scrape(operations.metrics_port)
        finally:
            await operations.close()
        for secret in (pair.tunnel.source_token, pair.tunnel.destination_token, *CLIENT_TOKENS):
            assert secret not in body
        found = samples(body)
        src, dst = pair.src.name, pair.dst.name
        assert src != dst and src.startswith("source@127.0.0.1:")
        assert value(found, "localproxy_websocket_connected", tunnel=src, mode="source") == 1
        assert value(found, "localproxy_websocket_sessions_total", tunnel=dst, mode="destination") == 1
        assert value(found, "localproxy_tunnel_sent_bytes_total", tunnel=src, service="SSH") == 5000
        assert value(found, "localproxy_tunnel_received_bytes_total", tunnel=src, service="SSH") == 5000
        assert value(found, "localproxy_local_connections_started_total", tunnel=dst, service="SSH") == 1
        assert value(found, "localproxy_handshake_refusals_total", tunnel=src, mode="source", **{"class": "used_token"}) == 0
    finally:
        await app.close()


async def test_metrics_busy_port_is_a_config_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = MetricsServer("127.0.0.1", port, lambda: ([], None))
        with pytest.raises(ConfigError, match=f"Cannot serve metrics on 127.0.0.1 port {port} "):
            server.start()


ARGS = ["-e", "ws://127.0.0.1:9", "-d", "SSH=22", "-v", "4"]


def test_cli_busy_metrics_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = proxy_main([*ARGS, "-t", "tok-" + "s" * 20, "--metrics-port", str(port)])
    out = capsys.readouterr().out
    assert code == ExitCode.CONFIG == 2
    assert f"Cannot serve metrics on 127.0.0.1 port {port} (--metrics-port)" in out
    assert "Traceback" not in out and "tok-" + "s" * 20 not in out


def test_agent_busy_metrics_port_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("aiomqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py
    from localproxy.agent.cli import main as agent_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = agent_main(["--thing-name", "t", "--mqtt-endpoint", "mqtt://127.0.0.1:9", "--service", "SSH=22",
                           "--metrics-port", str(port)])
    assert code == ExitCode.CONFIG
    assert f"Cannot serve metrics on 127.0.0.1 port {port} (--metrics-port)" in capsys.readouterr().out


def test_cli_without_prometheus_client_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in sys.modules if name.startswith("prometheus_client")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    code = proxy_main([*ARGS, "-t", "tok-" + "s" * 20, "--metrics-port", "0"])
    out = capsys.readouterr().out
    assert code == ExitCode.CONFIG
    assert MISSING_LIBRARY in out and "Traceback" not in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics-port", "http"], "the argument ('http') for option '--metrics-port' is invalid"),
        (["--metrics-port", "70000"], "the argument ('70000') for option '--metrics-port' is invalid"),
        (["--metrics-bind", "0.0.0.0"], "--metrics-bind needs --metrics-port"),
        (["--log-format", "xml"], "the argument ('xml') for option '--log-format' is invalid"),
    ],
)
def test_cli_operations_usage_errors(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert proxy_main([*ARGS, "-t", "token", *extra]) == ExitCode.USAGE
    assert message in capsys.readouterr().err


def test_cli_operations_options_parse() -> None:
    parsed = parse_command_line(
        [*ARGS, "-t", "token", "--metrics-port", "9464", "--metrics-bind", "::1", "--log-format", "json"], {}
    )
    assert (parsed.metrics_port, parsed.metrics_bind, parsed.log_format) == (9464, "::1", "json")
    default = parse_command_line([*ARGS, "-t", "token"], {})
    assert (default.metrics_port, default.metrics_bind, default.log_format) == (None, "127.0.0.1", "reference")
