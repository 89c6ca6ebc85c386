"""The device agent: receive tunnel tokens over MQTT, keep destination proxies connected.

``python -m localproxy.agent`` (console script ``localproxy-agent``) or, as a library::

    from localproxy.agent import DeviceAgent, MqttSettings
    async with DeviceAgent("my-thing", MqttSettings.parse("mqtt://127.0.0.1:1883"),
                           {"SSH": DestinationTarget("localhost", 22)}) as agent:
        agent.subscribe(print)

See ``agent.py`` (what it does), ``plan.py`` (tunnel identity, --max-tunnels),
``notify.py`` (the notification format), ``mqtt.py`` (broker connection).
"""

from __future__ import annotations

from localproxy.agent.agent import DEFAULT_MAX_TUNNELS, DeviceAgent
from localproxy.agent.events import (
    AgentEvent,
    MqttConnected,
    MqttDisconnected,
    NotificationIgnored,
    NotificationReceived,
    NotificationRejected,
    ProxyEvent,
    ProxyStarted,
    ProxyStopped,
)
from localproxy.agent.mqtt import MqttSettings
from localproxy.agent.notify import (
    InvalidNotification,
    Notification,
    notify_topic,
    parse_notification,
)
from localproxy.agent.plan import StopReason, TunnelKey, WhenFull

__all__ = [
    "DEFAULT_MAX_TUNNELS",
    "AgentEvent",
    "DeviceAgent",
    "InvalidNotification",
    "MqttConnected",
    "MqttDisconnected",
    "MqttSettings",
    "Notification",
    "NotificationIgnored",
    "NotificationReceived",
    "NotificationRejected",
    "ProxyEvent",
    "ProxyStarted",
    "ProxyStopped",
    "StopReason",
    "TunnelKey",
    "WhenFull",
    "notify_topic",
    "parse_notification",
]
