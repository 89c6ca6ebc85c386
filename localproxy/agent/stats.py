"""The device agent's counters, kept from the events it emits (see :mod:`localproxy.ops.stats`)."""

from __future__ import annotations

from collections import defaultdict
from types import MappingProxyType

from localproxy.agent.events import (
    AgentEvent,
    MqttConnected,
    MqttDisconnected,
    NotificationIgnored,
    NotificationRejected,
    ProxyStarted,
)
from localproxy.ops.stats import AgentStats, ProxyStats

__all__ = ["AgentCounters"]


class AgentCounters:
    """Notifications by (outcome, reason), proxies started, MQTT state."""

    def __init__(self) -> None:
        self.mqtt_connected = False
        self.proxies_started = 0
        self.notifications: defaultdict[tuple[str, str], int] = defaultdict(int)

    def on_event(self, event: AgentEvent) -> None:
        if isinstance(event, ProxyStarted):
            self.proxies_started += 1
            reason = "new_tunnel" if event.replaces is None else "rotation"
            self.notifications["accepted", reason] += 1
        elif isinstance(event, NotificationRejected):
            self.notifications["rejected", event.kind] += 1
        elif isinstance(event, NotificationIgnored):
            self.notifications["ignored", event.kind] += 1
        elif isinstance(event, MqttConnected):
            self.mqtt_connected = True
        elif isinstance(event, MqttDisconnected):
            self.mqtt_connected = False

    def snapshot(self, tunnels: int, proxies: tuple[ProxyStats, ...]) -> AgentStats:
        return AgentStats(
            mqtt_connected=self.mqtt_connected,
            tunnels=tunnels,
            proxies_started=self.proxies_started,
            notifications=MappingProxyType(dict(self.notifications)),
            proxies=proxies,
        )
