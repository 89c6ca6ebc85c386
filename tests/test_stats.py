"""Counters without sockets: TunnelState's dropped frames, refusal classes, agent counters, metric families."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from localproxy.config.proxy_config import ProxyConfig, tunnel_label
from localproxy.emulator.mqtt import notify_payload
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    HandshakeRejectedError,
    ProtocolError,
    ServiceUnavailableError,
    TunnelClosedError,
)
from localproxy.ops.metrics import metric_families
from localproxy.ops.operations import agent_status, proxy_status
from localproxy.ops.stats import AgentStats, ProxyCounters, refusal_class
from localproxy.settings import V2, V3
from localproxy.tunnel.state import TunnelState
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort
from localproxy.wire.codec import Message, MessageType

T = MessageType
SSH = DestinationTarget("127.0.0.1", 22)


def started_destination(subprotocol: str = V3) -> TunnelState:
    tunnel = TunnelState(Mode.DESTINATION, {"SSH": SSH})
    tunnel.session_started(subprotocol)
    tunnel.receive([Message(type=T.SERVICE_IDS, available_service_ids=("SSH",))])
    tunnel.receive([Message(type=T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1 if subprotocol == V3 else 0)])
    return tunnel


def test_destination_counts_dropped_frames_by_rule() -> None:
    tunnel = started_destination()
    assert tunnel.dropped == {}
    tunnel.receive([
        Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=7, payload=b"x"),  # no such connection
        Message(type=T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=7),
        Message(type=T.DATA, stream_id=1, service_id="WEB", connection_id=1, payload=b"x"),  # not a service here
        Message(type=T.STREAM_START, stream_id=2, service_id="WEB", connection_id=1),
        Message(type=99, stream_id=1, ignorable=True),
        Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"ok"),  # delivered
    ])  # fmt: skip
    assert tunnel.dropped == {"unknown_connection": 2, "unknown_service": 2, "unknown_type": 1}
    tunnel.receive([Message(type=T.STREAM_START, stream_id=3, service_id="SSH", connection_id=1)])
    tunnel.receive([Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"late")])
    assert tunnel.dropped["stale_stream"] == 1
    tunnel.data_error(ProtocolError("bad frame"))
    assert tunnel.dropped["protocol_error"] == 1


def test_connection_start_on_a_v2_stream_is_counted() -> None:
    tunnel = started_destination(V2)
    tunnel.receive([Message(type=T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2)])
    assert tunnel.dropped == {"connection_start_without_ids": 1}


def test_connections_by_service_counts_live_and_held() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": SourcePort(0), "WEB": SourcePort(0)}, destination_client_type="V2")
    tunnel.session_started(V2)
    tunnel.receive([Message(type=T.SERVICE_IDS, available_service_ids=("SSH", "WEB"))])
    for service in ("SSH", "SSH", "WEB"):
        tunnel.local_opened(service)  # V2: the second SSH connection is held
    assert tunnel.connections_by_service() == {"SSH": 2, "WEB": 1}


@pytest.mark.parametrize(
    "error, expected",
    [
        (AccessTokenUsedError("x", status=400), "used_token"),
        (ClientTokenMismatchError("x", status=400), "client_token_mismatch"),
        (TunnelClosedError("x", status=410), "other_4xx"),
        (HandshakeRejectedError("x", status=403), "other_4xx"),
        (ServiceUnavailableError("x", status=503), "5xx"),
        (HandshakeRejectedError("x", status=502), "5xx"),
    ],
)
def test_refusal_classes(error: HandshakeRejectedError, expected: str) -> None:
    assert refusal_class(error) == expected


def test_tunnel_label_never_uses_a_token() -> None:
    config = ProxyConfig(mode=Mode.SOURCE, access_token="secret-token", endpoint=ServiceEndpoint.parse("ws://h:1"),
                         client_token="c" * 32)
    assert tunnel_label(config) == "source@h:1"
    assert tunnel_label(dataclasses.replace(config, tunnel_id="tid-1")) == "tid-1"


def test_snapshot_is_frozen_and_independent() -> None:
    counters = ProxyCounters()
    sent = {"SSH": 5}
    stats = counters.snapshot("t", "source", services=("SSH",), active={}, received={}, sent=sent, dropped={})
    sent["SSH"] = 6
    assert stats.bytes_sent["SSH"] == 5
    with pytest.raises(TypeError):
        stats.bytes_sent["SSH"] = 7  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.sessions = 3  # type: ignore[misc]
    assert proxy_status(stats) == "source connecting"


async def test_agent_counts_notifications_by_outcome_and_reason(emulator: Any) -> None:
    pytest.importorskip("aiomqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py
    from localproxy.agent import DeviceAgent, ProxyStarted

    tunnel = emulator.open_tunnel(services=["SSH"])
    async with DeviceAgent("stats-thing", None, {"SSH": SSH}, endpoint=emulator.data_url) as agent:
        started = asyncio.Event()
        agent.subscribe(lambda event: started.set() if isinstance(event, ProxyStarted) else None)
        payload = notify_payload(tunnel.destination_token, "us-east-1", ["SSH"])
        await agent.handle_notification(payload)
        await asyncio.wait_for(started.wait(), 10)
        await agent.handle_notification(payload)  # redelivered
        await agent.handle_notification(b"{not json")
        await agent.handle_notification(notify_payload("other-token", "us-east-1", ["VNC"]))
        stats = agent.stats()
    assert stats.tunnels == 1 and stats.proxies_started == 1 and not stats.mqtt_connected
    assert dict(stats.notifications) == {
        ("accepted", "new_tunnel"): 1,
        ("ignored", "duplicate"): 1,
        ("rejected", "invalid"): 1,
        ("rejected", "unmapped_service"): 1,
    }
    assert [proxy.tunnel for proxy in stats.proxies] == ["SSH@us-east-1"]
    families = {family.name: family for family in metric_families((list(stats.proxies), stats))}
    notifications = {tuple(s.labels.values()): s.value for s in families["localproxy_agent_notifications"].samples}
    assert notifications[("rejected", "unmapped_service")] == 1
    assert families["localproxy_agent_tunnels"].samples[0].value == 1
    assert agent_status(stats) in ("1 tunnel, destination connected, MQTT not connected",
                                   "1 tunnel, destination not connected, MQTT not connected")


def test_agent_status_wording() -> None:
    stats = AgentStats(mqtt_connected=True, tunnels=2, proxies_started=3, notifications={}, proxies=())
    assert agent_status(stats) == "2 tunnels, 0 destinations connected, MQTT connected"


def test_metric_labels_are_redacted() -> None:
    from localproxy.ops.logs import REDACTED, register_secret

    register_secret("embedder-secret-token")
    stats = ProxyCounters().snapshot("name-embedder-secret-token", "source", services=("SSH",), active={},
                                     received={}, sent={}, dropped={})
    labels = {s.labels["tunnel"] for family in metric_families(([stats], None)) for s in family.samples}
    assert labels == {f"name-{REDACTED}"}
