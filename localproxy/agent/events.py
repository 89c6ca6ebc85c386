"""Typed events a :class:`~localproxy.agent.DeviceAgent` hands to its subscribers.

``agent.subscribe(callback)`` calls ``callback(event)`` synchronously in the
event loop. Frozen dataclasses; none holds a token. A tunnel is named by its
key ``(region, sorted service ids)`` and each proxy the agent starts by a
``generation`` number that grows through the agent's life.
"""

from __future__ import annotations

from dataclasses import dataclass

from localproxy.agent.plan import StopReason, TunnelKey
from localproxy.errors import LocalProxyError
from localproxy.events import Event as ProxyEngineEvent

__all__ = [
    "AgentEvent",
    "MqttConnected",
    "MqttDisconnected",
    "NotificationIgnored",
    "NotificationReceived",
    "NotificationRejected",
    "ProxyEvent",
    "ProxyStarted",
    "ProxyStopped",
]


@dataclass(frozen=True)
class MqttConnected:
    """Connected to the broker and subscribed to ``topic`` (after every reconnect)."""

    broker: str
    topic: str


@dataclass(frozen=True)
class MqttDisconnected:
    """Lost (or could not get) the broker connection; retrying in ``retry_in`` s."""

    broker: str
    reason: str
    retry_in: float


@dataclass(frozen=True)
class NotificationReceived:
    """A valid notification arrived (before deciding what to do with it)."""

    region: str
    services: tuple[str, ...]


@dataclass(frozen=True)
class NotificationRejected:
    """A notification was not acted on because it is wrong or cannot be served.

    ``kind``: invalid, unmapped_service, full, queue_full (a metrics label)."""

    reason: str
    services: tuple[str, ...] = ()
    kind: str = "invalid"


@dataclass(frozen=True)
class NotificationIgnored:
    """A notification was not acted on, harmlessly (a redelivered token)."""

    reason: str
    services: tuple[str, ...] = ()
    kind: str = "duplicate"


@dataclass(frozen=True)
class ProxyStarted:
    """A destination proxy started for ``tunnel``; ``replaces`` is the generation it replaced."""

    tunnel: TunnelKey
    generation: int
    replaces: int | None = None


@dataclass(frozen=True)
class ProxyStopped:
    """A destination proxy is gone (closed and awaited, or died); ``error`` if it failed."""

    tunnel: TunnelKey
    generation: int
    reason: StopReason
    error: LocalProxyError | None = None


@dataclass(frozen=True)
class ProxyEvent:
    """An event of one of the agent's proxies (``localproxy.events``: Connected...)."""

    tunnel: TunnelKey
    generation: int
    event: ProxyEngineEvent


AgentEvent = (
    MqttConnected
    | MqttDisconnected
    | NotificationReceived
    | NotificationRejected
    | NotificationIgnored
    | ProxyStarted
    | ProxyStopped
    | ProxyEvent
)
