"""systemd notifications: a real AF_UNIX datagram socket as NOTIFY_SOCKET, real programs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxyproc import ProxyProcess, echo_app

from localproxy.emulator import Emulator
from localproxy.ops.sdnotify import ServiceNotifier, watchdog_interval

TIMEOUT = 10


class NotifySocket:
    """The service manager's end: collects notification datagrams."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait(
        self, key: str, value: str | None = None, timeout: float = TIMEOUT, since: int = 0
    ) -> dict[str, str]:
        """The first message from index ``since`` on (received before or now) with ``key`` (= ``value``)."""
        loop = asyncio.get_running_loop()

        def match(message: dict[str, str]) -> bool:
            return key in message and (value is None or message[key] == value)

        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages[since:]:
                    if match(message):
                        return message
                data = await loop.sock_recv(self.sock, 4096)
                self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def count(self, key: str) -> int:
        return sum(1 for message in self.messages if key in message)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.sock.close()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None
    assert ServiceNotifier.from_environment({}) is None


async def test_notifier_path_and_abstract_addresses(notify_socket: NotifySocket) -> None:
    abstract = NotifySocket(f"@localproxy-test-{os.getpid()}-{id(notify_socket)}")
    try:
        for receiver in (notify_socket, abstract):
            notifier = ServiceNotifier.from_environment({"NOTIFY_SOCKET": receiver.address})
            assert notifier is not None
            assert notifier.notify(READY="1", STATUS="two\nlines")
            assert await receiver.wait("READY", "1") == {"READY": "1", "STATUS": "two lines"}
            notifier.close()
    finally:
        abstract.sock.close()
    gone = ServiceNotifier(str(Path(notify_socket.address).with_name("absent.sock")))
    assert gone.notify(READY="1") is False  # logged once, never raised
    gone.close()


async def scrape(port: int) -> dict[str, float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
            return reply.read().decode()

    body = await asyncio.to_thread(get)
    return {
        sample.name + str(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def test_destination_proxy_ready_status_watchdog_stopping_and_metrics(
    emulator: Any, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    settings = tmp_path / "settings.json"  # reconnect at once after the drop below
    settings.write_text(json.dumps({"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "50"}}}}))
    app, port = await echo_app()
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"}  # a ping every 50 ms
    child = await ProxyProcess.start(
        "-e", emulator.data_url, "-d", f"SSH=127.0.0.1:{port}", "--metrics-port", "0",
        "--settings-json", str(settings),
        token=tunnel.destination_token, extra_env=env,
    )
    try:
        metrics_port = int((await child.wait_for_line(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1))
        ready = await notify_socket.wait("READY", "1")
        assert ready["STATUS"] == "destination connected (SSH)"
        found = await scrape(metrics_port)
        label = "destination@" + emulator.data_url.split("://", 1)[1]  # no --tunnel-id: mode@endpoint
        assert found[f"localproxy_websocket_connected[('mode', 'destination'), ('tunnel', '{label}')]"] == 1
        for _ in range(3):  # the watchdog keeps pinging from the event loop
            await notify_socket.wait("WATCHDOG", "1")
            notify_socket.messages = [m for m in notify_socket.messages if "WATCHDOG" not in m]
        mark = len(notify_socket.messages)
        await emulator.drop(tunnel.tunnel_id, "destination")
        await notify_socket.wait("STATUS", "destination disconnected, reconnecting", since=mark)
        await notify_socket.wait("STATUS", "destination connected (SSH)", since=mark)  # again, after the drop
        assert await child.stop() == 0
        await notify_socket.wait("STOPPING", "1")
        assert notify_socket.count("READY") == 1
    finally:
        await child.kill()
        app.close()


async def test_agent_ready_when_subscribed_and_status_counts_tunnels(notify_socket: NotifySocket) -> None:
    pytest.importorskip("aiomqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py
    pytest.importorskip("amqtt", reason="needs the mqtt extra")
    async with Emulator(port=0, mqtt=True) as emu:
        app, port = await echo_app()
        assert emu.mqtt_url is not None
        child = await ProxyProcess.start(
            "--thing-name", "ops-thing", "--mqtt-endpoint", emu.mqtt_url, "--endpoint", emu.data_url,
            "--service", f"SSH=127.0.0.1:{port}", "--mqtt-retry-ms", "50", "--metrics-port", "0",
            "--log-format", "json",
            module="localproxy.agent", extra_env={"NOTIFY_SOCKET": notify_socket.address},
        )
        try:
            line = await child.wait_for_line(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
            metrics_port = int(line.group(1))
            ready = await notify_socket.wait("READY", "1")
            assert ready["STATUS"] == "0 tunnels, 0 destinations connected, MQTT connected"
            tunnel = emu.open_tunnel(services=["SSH"], thing_name="ops-thing")
            await notify_socket.wait("STATUS", "1 tunnel, destination connected, MQTT connected")
            await emu.wait_connected(tunnel.tunnel_id, "destination")
            found = await scrape(metrics_port)
            assert found["localproxy_agent_tunnels[]"] == 1
            assert found["localproxy_agent_notifications_total[('outcome', 'accepted'), ('reason', 'new_tunnel')]"] == 1
            assert found["localproxy_websocket_connected[('mode', 'destination'), ('tunnel', 'SSH@us-east-1')]"] == 1
            assert tunnel.destination_token not in child.text
            assert await child.stop() == 0
            await notify_socket.wait("STOPPING", "1")
        finally:
            await child.kill()
            app.close()
