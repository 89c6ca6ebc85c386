"""The emulator's MQTT side: embedded broker, notify publisher, and what OpenTunnel/rotation publish.

Real amqtt broker on loopback, real aiomqtt clients, boto3 against the emulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("amqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py

import aiomqtt  # noqa: E402
import boto3  # noqa: E402
from aws_client import api_for, call

import localproxy
from localproxy.emulator import Emulator
from localproxy.emulator.mqtt import (
    EmbeddedBroker,
    NotifyPublisher,
    notify_payload,
    notify_topic,
)

REPO_ROOT = Path(localproxy.__file__).resolve().parent.parent
TIMEOUT = 10




@asynccontextmanager
async def subscriber(url: str, topic: str) -> AsyncIterator[Callable[[], Any]]:
    """A QoS 1 subscriber; yields ``next_message()`` (awaitable, with a timeout)."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    async with aiomqtt.Client(host, int(port), timeout=TIMEOUT) as client:
        granted = await client.subscribe(topic, qos=1)
        assert [int(getattr(code, "value", code)) for code in granted] == [1]
        iterator = client.messages.__aiter__()

        async def next_message() -> aiomqtt.Message:
            return await asyncio.wait_for(iterator.__anext__(), TIMEOUT)

        yield next_message


async def test_embedded_broker_binds_a_free_loopback_port_and_delivers_dollar_topics() -> None:
    async with EmbeddedBroker() as broker:
        assert broker.running and broker.port > 0
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        topic = notify_topic("thing-1")
        assert topic == "$aws/things/thing-1/tunnels/notify"
        async with subscriber(broker.url, topic) as next_message:
            assert broker.subscribers(topic) == 1
            async with NotifyPublisher(broker) as publisher:
                await publisher.publish("thing-1", "token-1", "us-east-1", ["SSH", "VNC"])
                message = await next_message()
                assert str(message.topic) == topic and message.qos == 1
                assert json.loads(message.payload) == {
                    "clientAccessToken": "token-1", "clientMode": "destination",
                    "region": "us-east-1", "services": ["SSH", "VNC"],
                }  # fmt: skip
                assert publisher.published == 1 and publisher.failed == 0
    assert not broker.running


async def test_restart_keeps_the_port_and_drops_every_client() -> None:
    async with EmbeddedBroker() as broker:
        port = broker.port
        topic = notify_topic("thing-r")
        async with subscriber(broker.url, topic) as next_message:
            await broker.restart()
            assert broker.port == port and broker.subscribers(topic) == 0
            with pytest.raises(aiomqtt.MqttError):
                await next_message()  # the old connection is gone
        async with subscriber(broker.url, topic) as next_message:
            await broker.publish(topic, b"after restart")
            assert (await next_message()).payload == b"after restart"


async def test_publisher_keeps_order_over_a_client_connection() -> None:
    """An external broker (URL form); amqtt refuses client publishes to $ topics, so a lab topic."""
    template = "lab/things/{thing}/tunnels/notify"
    async with (
        EmbeddedBroker() as broker,
        NotifyPublisher(broker.url, topic_template=template) as publisher,
        subscriber(broker.url, "lab/things/t/tunnels/notify") as next_message,
    ):
        for index in range(5):
            publisher.submit("t", {"clientAccessToken": f"tok{index}", "region": "eu-west-1", "services": ["SSH"]})
        await asyncio.wait_for(publisher.drain(), TIMEOUT)
        tokens = [json.loads((await next_message()).payload)["clientAccessToken"] for _ in range(5)]
        assert tokens == [f"tok{index}" for index in range(5)]
        assert publisher.published == 5


async def test_publisher_reports_an_unreachable_broker_without_raising() -> None:
    async with EmbeddedBroker() as broker:
        url = broker.url
    async with NotifyPublisher(url, timeout=2) as publisher:  # the broker is gone
        publisher.submit("t", notify_payload("tok", "us-east-1", ["SSH"]))
        await asyncio.wait_for(publisher.drain(), TIMEOUT)
        assert publisher.failed == 1 and publisher.published == 0


async def test_open_tunnel_and_destination_rotation_publish_the_destination_token() -> None:
    async with Emulator(port=0, mqtt=True) as emu:
        assert emu.mqtt_url is not None and emu.mqtt_url.startswith("mqtt://127.0.0.1:")
        api = api_for(emu)
        async with subscriber(emu.mqtt_url, notify_topic("RemoteThing1")) as next_message:
            opened = await call(
                api.open_tunnel, destinationConfig={"thingName": "RemoteThing1", "services": ["SSH"]}
            )
            first = json.loads((await next_message()).payload)
            assert first == {
                "clientAccessToken": opened["destinationAccessToken"], "clientMode": "destination",
                "region": "us-east-1", "services": ["SSH"],
            }  # fmt: skip

            # SOURCE rotation and a tunnel for no thing publish nothing: the next
            # message on the topic is the DESTINATION rotation's.
            await call(api.rotate_tunnel_access_token, tunnelId=opened["tunnelId"], clientMode="SOURCE")
            await call(api.open_tunnel, destinationConfig={"services": ["SSH"]})
            rotated = await call(
                api.rotate_tunnel_access_token, tunnelId=opened["tunnelId"], clientMode="DESTINATION",
                destinationConfig={"thingName": "RemoteThing1", "services": ["SSH"]},
            )  # fmt: skip
            second = json.loads((await next_message()).payload)
            assert second["clientAccessToken"] == rotated["destinationAccessToken"] != first["clientAccessToken"]

            everything = await call(
                api.rotate_tunnel_access_token, tunnelId=opened["tunnelId"], clientMode="ALL",
                destinationConfig={"thingName": "RemoteThing1", "services": ["SSH"]},
            )  # fmt: skip
            third = json.loads((await next_message()).payload)
            assert third["clientAccessToken"] == everything["destinationAccessToken"]
        assert [n["clientAccessToken"] for n in emu.notifications("RemoteThing1")] == [
            first["clientAccessToken"], second["clientAccessToken"], third["clientAccessToken"],
        ]  # fmt: skip
    assert emu.mqtt_url is None  # stopped


async def test_library_calls_publish_like_the_api() -> None:
    async with Emulator(port=0, mqtt=True, region="eu-west-1") as emu:
        assert emu.mqtt_url is not None
        async with subscriber(emu.mqtt_url, notify_topic("lib-thing")) as next_message:
            tunnel = emu.open_tunnel(services=["SSH", "VNC"], thing_name="lib-thing")
            opened = json.loads((await next_message()).payload)
            assert opened == {
                "clientAccessToken": tunnel.destination_token, "clientMode": "destination",
                "region": "eu-west-1", "services": ["SSH", "VNC"],
            }  # fmt: skip
            new = emu.rotate(tunnel.tunnel_id, "DESTINATION", services=["SSH"], thing_name="lib-thing")
            rotated = json.loads((await next_message()).payload)
            assert rotated["clientAccessToken"] == new["destinationAccessToken"] and rotated["services"] == ["SSH"]


async def test_emulator_without_mqtt_has_no_broker() -> None:
    async with Emulator(port=0) as emu:
        assert emu.mqtt_url is None and emu.mqtt_broker is None


async def test_emulator_program_prints_the_mqtt_url_and_publishes() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy.emulator", "--port", "0", "--mqtt", "-v", "2",
        cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        info = json.loads(await asyncio.wait_for(process.stdout.readline(), 15))
        assert info["mqtt"].startswith("mqtt://127.0.0.1:")
        emu_api = boto3.client(
            "iotsecuretunneling", endpoint_url=info["api"], region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x",
        )  # fmt: skip
        async with subscriber(info["mqtt"], notify_topic("cli-thing")) as next_message:
            opened = await call(emu_api.open_tunnel, destinationConfig={"thingName": "cli-thing", "services": ["SSH"]})
            message = json.loads((await next_message()).payload)
            assert message["clientAccessToken"] == opened["destinationAccessToken"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.communicate(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode == 0


async def test_emulator_program_rejects_a_bad_mqtt_url() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy.emulator", "--mqtt", "http://x",
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2 and b"--mqtt takes a broker URL" in stderr
