"""The device agent end to end: emulator + embedded MQTT broker + boto3 + real proxies.

Each test waits on agent or emulator events with timeouts; nothing sleeps for readiness.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiomqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py

import trustme
from aws_client import api_for, call

import localproxy
from localproxy.agent import (
    DeviceAgent,
    MqttConnected,
    MqttDisconnected,
    MqttSettings,
    NotificationIgnored,
    NotificationReceived,
    NotificationRejected,
    ProxyEvent,
    ProxyStarted,
    ProxyStopped,
    StopReason,
)
from localproxy.agent.cli import main as agent_main
from localproxy.config.proxy_config import ProxyConfig
from localproxy.emulator import Emulator
from localproxy.emulator.mqtt import EmbeddedBroker, notify_payload, notify_topic
from localproxy.errors import ConfigError, HandshakeRejectedError
from localproxy.events import Connected
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort

REPO_ROOT = Path(localproxy.__file__).resolve().parent.parent
TIMEOUT = 10
FAST = Settings(retry_delay_ms=100, tcp_connection_retry_delay_ms=100, tcp_connection_retry_count=2)
MQTT_FAST = {"retry_delay_ms": 50, "max_retry_delay_ms": 200}


class Recorder:
    """Every agent event, and waiting for one that matches (history included)."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()
        agent.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    async def wait(self, predicate: Callable[[Any], bool], since: int = 0, timeout: float = TIMEOUT) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def index(self, predicate: Callable[[Any], bool]) -> int:
        for i, event in enumerate(self.events):
            if predicate(event):
                return i
        raise AssertionError(f"no such event in {self.events}")

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


def connected(generation: int) -> Callable[[Any], bool]:
    return lambda e: isinstance(e, ProxyEvent) and e.generation == generation and isinstance(e.event, Connected)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@asynccontextmanager
async def echo_server() -> AsyncIterator[DestinationTarget]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield DestinationTarget("127.0.0.1", server.sockets[0].getsockname()[1])


async def round_trip(port: int, size: int = 256 * 1024) -> None:
    payload = os.urandom(size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        received = await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
    finally:
        writer.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()




def make_agent(emu: Emulator, thing: str, services: dict[str, DestinationTarget], **options: Any) -> DeviceAgent:
    assert emu.mqtt_url is not None
    mqtt = MqttSettings.parse(emu.mqtt_url, **MQTT_FAST)
    return DeviceAgent(thing, mqtt, services, endpoint=emu.data_url, proxy_settings=FAST, **options)


def source_proxy(emu: Emulator, token: str, service: str = "SSH") -> LocalProxy:
    config = ProxyConfig(
        mode=Mode.SOURCE, access_token=token, endpoint=ServiceEndpoint.parse(emu.data_url),
        services={service: SourcePort(0)}, bind_address="127.0.0.1", settings=FAST,
    )  # fmt: skip
    return LocalProxy(config)


class LogLines(logging.Handler):
    """Raw (unredacted) messages of every ``localproxy`` log record, debug included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + (str(record.exc_info) if record.exc_info else ""))


@pytest.fixture
def log_lines() -> Any:
    handler = LogLines()
    root = logging.getLogger("localproxy")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


async def test_open_rotate_destination_replaces_the_proxy_and_data_flows(log_lines: LogLines) -> None:
    thing = "RemoteThing1"
    async with Emulator(port=0, mqtt=True) as emu, echo_server() as ssh:
        api = api_for(emu)
        async with make_agent(emu, thing, {"SSH": ssh}) as agent:
            events = Recorder(agent)
            await events.wait(lambda e: isinstance(e, MqttConnected))
            assert agent.topic == f"$aws/things/{thing}/tunnels/notify"

            opened = await call(api.open_tunnel, destinationConfig={"thingName": thing, "services": ["SSH"]})
            tunnel_id = opened["tunnelId"]
            first: ProxyStarted = await events.wait(lambda e: isinstance(e, ProxyStarted))
            assert first.tunnel == ("us-east-1", ("SSH",)) and first.replaces is None
            await events.wait(connected(first.generation))
            await emu.wait_connected(tunnel_id, "destination")
            described = await call(api.describe_tunnel, tunnelId=tunnel_id)
            assert described["tunnel"]["destinationConnectionState"]["status"] == "CONNECTED"

            async with source_proxy(emu, opened["sourceAccessToken"]) as source:
                await asyncio.wait_for(source.ready, TIMEOUT)
                port = source.ports["SSH"]
                await round_trip(port)

                mark = events.mark()
                rotated = await call(
                    api.rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="DESTINATION",
                    destinationConfig={"thingName": thing, "services": ["SSH"]},
                )  # fmt: skip
                second: ProxyStarted = await events.wait(lambda e: isinstance(e, ProxyStarted), since=mark)
                await events.wait(connected(second.generation), since=mark)
                await emu.wait_connected(tunnel_id, "destination")

                # The old proxy was stopped (replaced, or it died on its revoked token
                # first) before the new one connected; one destination session remains.
                stopped = events.index(lambda e: isinstance(e, ProxyStopped) and e.generation == first.generation)
                assert stopped < events.index(connected(second.generation))
                assert events.events[stopped].reason in (StopReason.REPLACED, StopReason.FAILED)
                assert emu.sessions(tunnel_id, "destination") == 1
                assert emu.handshake_count(tunnel_id, "destination") == 2
                assert agent.tunnels == {("us-east-1", ("SSH",)): second.generation}
                described = await call(api.describe_tunnel, tunnelId=tunnel_id)
                assert described["tunnel"]["destinationConnectionState"]["status"] == "CONNECTED"
                await round_trip(port)

            received = events.of(NotificationReceived)
            assert [n.services for n in received] == [("SSH",), ("SSH",)]
        assert events.of(ProxyStopped)[-1].reason is StopReason.AGENT_STOPPING
        assert emu.sessions(tunnel_id, "destination") == 0

    secrets = [opened["destinationAccessToken"], rotated["destinationAccessToken"], opened["sourceAccessToken"]]
    assert any("Started destination proxy" in line for line in log_lines.lines)
    for line in log_lines.lines:
        assert not any(secret in line for secret in secrets), line


async def test_broker_restart_reconnects_resubscribes_and_serves_the_next_notification() -> None:
    thing = "thing-restart"
    async with Emulator(port=0, mqtt=True) as emu, echo_server() as ssh:
        assert emu.mqtt_broker is not None
        async with make_agent(emu, thing, {"SSH": ssh}) as agent:
            events = Recorder(agent)
            await events.wait(lambda e: isinstance(e, MqttConnected))
            port = emu.mqtt_broker.port
            await emu.mqtt_broker.restart()
            assert emu.mqtt_broker.port == port
            await events.wait(lambda e: isinstance(e, MqttDisconnected))
            mark = events.mark()
            await events.wait(lambda e: isinstance(e, MqttConnected), since=mark)
            assert emu.mqtt_broker.subscribers(agent.topic) == 1

            opened = await call(api_for(emu).open_tunnel, destinationConfig={"thingName": thing, "services": ["SSH"]})
            started = await events.wait(lambda e: isinstance(e, ProxyStarted))
            await events.wait(connected(started.generation))
            await emu.wait_connected(opened["tunnelId"], "destination")


async def test_malformed_and_unknown_service_notifications_have_no_effect() -> None:
    thing = "thing-reject"
    async with Emulator(port=0, mqtt=True) as emu, echo_server() as ssh:
        broker = emu.mqtt_broker
        assert broker is not None
        async with make_agent(emu, thing, {"SSH": ssh}) as agent:
            events = Recorder(agent)
            await events.wait(lambda e: isinstance(e, MqttConnected))
            topic = notify_topic(thing)

            await broker.publish(topic, b"not json at all")
            bad = await events.wait(lambda e: isinstance(e, NotificationRejected))
            assert "not UTF-8 JSON" in bad.reason

            mark = events.mark()
            await broker.publish(topic, json.dumps({"clientAccessToken": "x", "clientMode": "source"}).encode())
            bad = await events.wait(lambda e: isinstance(e, NotificationRejected), since=mark)
            assert "clientMode" in bad.reason

            mark = events.mark()
            opened = await call(api_for(emu).open_tunnel, destinationConfig={"thingName": thing, "services": ["RDP"]})
            unknown = await events.wait(lambda e: isinstance(e, NotificationRejected), since=mark)
            assert unknown.services == ("RDP",) and "no mapping for service(s) RDP" in unknown.reason

            mark = events.mark()
            await broker.publish(topic, notify_payload("redelivered-token", "us-east-1", ["VNC"]))
            await events.wait(lambda e: isinstance(e, NotificationRejected), since=mark)
            await broker.publish(topic, notify_payload("redelivered-token", "us-east-1", ["VNC"]))
            await events.wait(lambda e: isinstance(e, NotificationIgnored), since=mark)

            assert events.of(ProxyStarted) == [] and agent.tunnels == {}
            assert emu.handshake_count(opened["tunnelId"], "destination") == 0


async def test_max_tunnels_evicts_the_oldest_tunnel() -> None:
    thing = "thing-max"
    async with Emulator(port=0, mqtt=True) as emu, echo_server() as app:
        api = api_for(emu)
        async with make_agent(emu, thing, {"SSH": app, "VNC": app}, max_tunnels=1) as agent:
            events = Recorder(agent)
            await events.wait(lambda e: isinstance(e, MqttConnected))
            ssh = await call(api.open_tunnel, destinationConfig={"thingName": thing, "services": ["SSH"]})
            first = await events.wait(lambda e: isinstance(e, ProxyStarted))
            await emu.wait_connected(ssh["tunnelId"], "destination")

            mark = events.mark()
            vnc = await call(api.open_tunnel, destinationConfig={"thingName": thing, "services": ["VNC"]})
            evicted = await events.wait(lambda e: isinstance(e, ProxyStopped), since=mark)
            assert evicted.generation == first.generation and evicted.reason is StopReason.EVICTED
            second = await events.wait(lambda e: isinstance(e, ProxyStarted), since=mark)
            await events.wait(connected(second.generation), since=mark)
            await emu.wait_connected(vnc["tunnelId"], "destination")
            await emu.wait_disconnected(ssh["tunnelId"], "destination")
            assert list(agent.tunnels) == [("us-east-1", ("VNC",))]
            assert events.index(lambda e: e is evicted) < events.index(connected(second.generation))


async def test_a_refused_token_is_logged_and_the_proxy_removed() -> None:
    async with (
        Emulator(port=0) as emu,
        echo_server() as ssh,
        DeviceAgent("lib-thing", None, {"SSH": ssh}, endpoint=emu.data_url, proxy_settings=FAST) as agent,
    ):
        events = Recorder(agent)
        await agent.handle_notification(notify_payload("not-a-token-the-service-issued", "us-east-1", ["SSH"]))
        started = await events.wait(lambda e: isinstance(e, ProxyStarted))
        stopped = await events.wait(lambda e: isinstance(e, ProxyStopped))
        assert stopped.generation == started.generation and stopped.reason is StopReason.FAILED
        assert isinstance(stopped.error, HandshakeRejectedError)
        assert agent.tunnels == {} and agent.proxy(started.tunnel) is None


async def test_mqtt_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("tls-thing")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key", "ccert", "ckey")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client.cert_chain_pems[0].write_to_path(paths["ccert"])
    client.private_key_pem.write_to_path(paths["ckey"])

    async with EmbeddedBroker(certfile=paths["cert"], keyfile=paths["key"], cafile=paths["ca"]) as broker:
        assert broker.url.startswith("mqtts://")
        mqtt = MqttSettings(
            "127.0.0.1", broker.port, cert=paths["ccert"], key=paths["ckey"], root_ca=paths["ca"], **MQTT_FAST
        )
        async with DeviceAgent("tls-thing", mqtt, {"SSH": DestinationTarget("127.0.0.1", 22)}) as agent:
            events = Recorder(agent)
            await events.wait(lambda e: isinstance(e, MqttConnected))
            await broker.publish(agent.topic, notify_payload("tok", "us-east-1", ["VNC"]))
            rejected = await events.wait(lambda e: isinstance(e, NotificationRejected))
            assert rejected.services == ("VNC",)

        # A broker whose certificate the root CA did not sign: refused, and retried.
        untrusted = MqttSettings("127.0.0.1", broker.port, root_ca=str(tmp_path / "other.pem"), **MQTT_FAST)
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
        async with DeviceAgent("tls-thing", untrusted, {"SSH": DestinationTarget("127.0.0.1", 22)}) as agent:
            events = Recorder(agent)
            failure = await events.wait(lambda e: isinstance(e, MqttDisconnected))
            assert "CERTIFICATE_VERIFY_FAILED" in failure.reason or "certificate verify failed" in failure.reason

    missing = MqttSettings("127.0.0.1", 8883, cert=str(tmp_path / "nope.pem"), key=paths["ckey"])
    with pytest.raises(ConfigError, match="--cert: no such file"):
        async with DeviceAgent("tls-thing", missing, {"SSH": DestinationTarget("127.0.0.1", 22)}):
            pass


def test_mqtt_endpoint_forms() -> None:
    aws = MqttSettings.parse("abc-ats.iot.us-east-1.amazonaws.com")
    assert (aws.host, aws.port, aws.tls) == ("abc-ats.iot.us-east-1.amazonaws.com", 8883, True)
    assert MqttSettings.parse("h:443").ssl_context() is not None
    assert (MqttSettings.parse("mqtt://127.0.0.1:1884").port, MqttSettings.parse("mqtt://h").port) == (1884, 1883)
    assert MqttSettings.parse("h", tls=False).url == "mqtt://h:1883"
    assert MqttSettings.parse("mqtts://[::1]:8884").url == "mqtts://[::1]:8884"


def test_cli_usage_errors_exit_1_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--thing-name", "t", "--mqtt-endpoint", "mqtt://127.0.0.1:1"]
    cases = [
        (base, "--service SSH=22"),
        (base + ["--service", "SSH=22", "--cert", "c.pem"], "both --cert and --key"),
        (base + ["--service", "SSH=nope:x"], "Invalid --service mapping"),
        (base + ["--service", "SSH=22", "--max-tunnels", "0"], "--max-tunnels"),
        (["--thing-name", "a/b", "--mqtt-endpoint", "h", "--service", "22"], "Invalid thing name"),
        (["--thing-name", "t", "--mqtt-endpoint", "http://h", "--service", "22"], "scheme 'http'"),
        (base + ["--service", "22", "--no-tls", "--root-ca", "x"], "need TLS"),
        (["--mqtt-endpoint", "h"], "--thing-name"),
    ]
    for argv, reason in cases:
        assert agent_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert reason in err and "Try 'localproxy-agent --help'" in err, (argv, err)
    assert agent_main(base + ["--config-dir", "/nonexistent-dir"]) == 2
    assert "Invalid configuration directory" in capsys.readouterr().err


def test_cli_passes_https_proxy_and_insecure_flag_to_its_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    from localproxy.agent.cli import agent_from_args, build_parser

    base = ["--thing-name", "t", "--mqtt-endpoint", "mqtt://127.0.0.1:1", "--service", "SSH=22"]
    monkeypatch.delenv("https_proxy", raising=False)  # the lower-case one would win
    monkeypatch.setenv("HTTPS_PROXY", "http://ops:pw-123456@127.0.0.1:3128")
    agent, notes = agent_from_args(build_parser().parse_args(base + ["-k"]))
    assert agent.https_proxy == "http://ops:pw-123456@127.0.0.1:3128"
    assert agent.verify_ssl is False
    assert any("SECURITY WARNING" in text for _, text in notes)
    monkeypatch.delenv("HTTPS_PROXY")
    agent, notes = agent_from_args(build_parser().parse_args(base))
    assert agent.https_proxy is None and agent.verify_ssl is True
    assert not any("SECURITY WARNING" in text for _, text in notes)


async def test_the_agent_program_serves_a_tunnel_and_stops_on_sigterm(tmp_path: Path) -> None:
    thing = "cli-thing"
    async with Emulator(port=0, mqtt=True) as emu, echo_server() as ssh:
        assert emu.mqtt_url is not None
        (tmp_path / "services").write_text(f"SSH={ssh.host}:{ssh.port}\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localproxy.agent", "--thing-name", thing, "--mqtt-endpoint", emu.mqtt_url,
            "--config-dir", str(tmp_path), "--endpoint", emu.data_url, "--mqtt-retry-ms", "50", "-v", "5",
            cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert process.stdout is not None
        output: list[str] = []

        async def read_until(text: str) -> None:
            assert process.stdout is not None
            while text not in (line := (await process.stdout.readline()).decode()):
                assert line, f"the agent exited: {''.join(output)}"
                output.append(line)
            output.append(line)

        try:
            await asyncio.wait_for(read_until("Subscribed to $aws/things/cli-thing/tunnels/notify"), 15)
            opened = await call(api_for(emu).open_tunnel, destinationConfig={"thingName": thing, "services": ["SSH"]})
            await emu.wait_connected(opened["tunnelId"], "destination", timeout=TIMEOUT)
            async with source_proxy(emu, opened["sourceAccessToken"]) as source:
                await asyncio.wait_for(source.ready, TIMEOUT)
                await round_trip(source.ports["SSH"], 64 * 1024)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                rest, _ = await asyncio.wait_for(process.communicate(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
        text = "".join(output) + rest.decode()
        assert process.returncode == 0, text
        assert "Started destination proxy #1 for SSH@us-east-1" in text
        assert "[info]" in text and opened["destinationAccessToken"] not in text
        await emu.wait_disconnected(opened["tunnelId"], "destination", timeout=TIMEOUT)
