"""What the agent does with each notification: the decisions, sans-I/O.

:class:`TunnelPlanner` holds the table of running destination proxies and turns
a notify payload into actions: :class:`Reject`, :class:`Ignore`, or
:class:`Stop` (zero or more, carried out first and awaited) then :class:`Start`.
The agent (``agent.py``) only carries them out.

Tunnel identity. A notification carries no tunnel id, only the token, the
region and the service ids. The planner identifies a tunnel by its region and
*set* of service ids (:data:`TunnelKey`): a notification for a set it already
serves is a rotation, and replaces that proxy. Limits: two tunnels open at once
to the same thing with the same services cannot both be served (the newer
notification wins and the older tunnel's destination goes away); a tunnel whose
services change on rotation (``--destination-config services=...``) is seen as
a new tunnel, and the old proxy stays until it fails (its token was revoked, so
its next reconnect is refused) or is evicted.

Capacity. At most ``max_tunnels`` proxies run. A new tunnel beyond that either
stops the least recently started one (:attr:`WhenFull.EVICT_OLDEST`, the
default: the operator's latest OpenTunnel/rotation is what someone is waiting
for, and an idle tunnel can live 12 hours) or is refused
(:attr:`WhenFull.REFUSE`). A rotation of a served tunnel never needs a new slot.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from localproxy.agent.notify import (
    InvalidNotification,
    Notification,
    parse_notification,
)
from localproxy.types import V1_SERVICE, DestinationTarget

__all__ = [
    "Action",
    "Ignore",
    "Reject",
    "Start",
    "Stop",
    "StopReason",
    "TunnelKey",
    "TunnelPlanner",
    "WhenFull",
    "tunnel_key",
    "tunnel_label",
]

# (region, sorted service ids): how the agent tells tunnels apart (see above).
TunnelKey = tuple[str, tuple[str, ...]]
DEFAULT_SEEN_LIMIT = 1024


class WhenFull(str, enum.Enum):
    """What a new tunnel does when ``max_tunnels`` proxies already run."""

    EVICT_OLDEST = "evict-oldest"
    REFUSE = "refuse"


class StopReason(str, enum.Enum):
    REPLACED = "replaced"  # a new token came for the same tunnel
    EVICTED = "evicted"  # max_tunnels reached, a newer tunnel took the slot
    FAILED = "failed"  # the proxy stopped with a fatal error (e.g. token refused)
    ENDED = "ended"  # the proxy stopped without an error
    AGENT_STOPPING = "agent stopping"


@dataclass(frozen=True)
class Reject:
    """Not acted on: ``reason`` says why (never holds a token); ``kind`` classes it for metrics."""

    reason: str
    services: tuple[str, ...] = ()
    kind: str = "invalid"  # invalid, unmapped_service, full


@dataclass(frozen=True)
class Ignore:
    """Not acted on, and nothing wrong with it (a duplicate)."""

    reason: str
    services: tuple[str, ...] = ()
    kind: str = "duplicate"


@dataclass(frozen=True)
class Stop:
    key: TunnelKey
    generation: int
    reason: StopReason


@dataclass(frozen=True)
class Start:
    """Start a destination proxy; ``replaces`` is the generation it takes over from."""

    key: TunnelKey
    generation: int
    notification: Notification
    targets: Mapping[str, DestinationTarget]
    replaces: int | None = None


Action = Reject | Ignore | Stop | Start


def tunnel_key(notification: Notification) -> TunnelKey:
    return (notification.region, tuple(sorted(notification.services)))


def tunnel_label(key: TunnelKey) -> str:
    """``SSH+VNC@us-east-1``: how logs name a tunnel."""
    return "+".join(key[1]) + "@" + key[0]


@dataclass
class _Running:
    generation: int


class TunnelPlanner:
    """The running-proxy table and the rules above. Not thread-safe; no I/O."""

    def __init__(
        self,
        services: Mapping[str, DestinationTarget],
        max_tunnels: int = 4,
        when_full: WhenFull = WhenFull.EVICT_OLDEST,
        seen_limit: int = DEFAULT_SEEN_LIMIT,
    ) -> None:
        if max_tunnels < 1:
            raise ValueError("max_tunnels must be at least 1")
        if not services:
            raise ValueError("the agent needs at least one service mapping")
        self.services = MappingProxyType(dict(services))
        self.max_tunnels = max_tunnels
        self.when_full = WhenFull(when_full)
        self._seen_limit = seen_limit
        self._seen: OrderedDict[str, None] = OrderedDict()  # token digests, oldest first
        self._running: OrderedDict[TunnelKey, _Running] = OrderedDict()  # least recently started first
        self._generation = 0

    @property
    def running(self) -> dict[TunnelKey, int]:
        """Tunnel key -> generation of its current proxy, least recently started first."""
        return {key: entry.generation for key, entry in self._running.items()}

    def on_notification(self, payload: bytes | bytearray | memoryview | str) -> list[Action]:
        try:
            notification = parse_notification(payload)
        except InvalidNotification as error:
            return [Reject(str(error))]
        return self.on_valid_notification(notification)

    def on_valid_notification(self, notification: Notification) -> list[Action]:
        services = notification.services
        digest = notification.token_digest
        if digest in self._seen:
            self._seen.move_to_end(digest)
            return [Ignore("duplicate: this token was already received", services)]
        self._remember(digest)

        targets, missing = self._targets(services)
        if missing:
            known = ", ".join(sorted(s for s in self.services if s != V1_SERVICE)) or "one unnamed service"
            return [Reject(f"no mapping for service(s) {', '.join(missing)} (this agent serves: {known})", services, "unmapped_service")]

        key = tunnel_key(notification)
        actions: list[Action] = []
        current = self._running.pop(key, None)
        replaces = None
        if current is not None:
            actions.append(Stop(key, current.generation, StopReason.REPLACED))
            replaces = current.generation
        elif len(self._running) >= self.max_tunnels:
            if self.when_full is WhenFull.REFUSE:
                return [Reject(f"already serving {len(self._running)} tunnel(s), the maximum (--max-tunnels)", services, "full")]
            oldest_key, oldest = next(iter(self._running.items()))
            del self._running[oldest_key]
            actions.append(Stop(oldest_key, oldest.generation, StopReason.EVICTED))
        self._generation += 1
        self._running[key] = _Running(self._generation)
        actions.append(Start(key, self._generation, notification, MappingProxyType(targets), replaces))
        return actions

    def on_proxy_ended(self, key: TunnelKey, generation: int) -> bool:
        """A proxy stopped by itself; True if it was current (now removed from the table)."""
        entry = self._running.get(key)
        if entry is None or entry.generation != generation:
            return False
        del self._running[key]
        return True

    def stop_all(self) -> list[Stop]:
        stops = [Stop(key, entry.generation, StopReason.AGENT_STOPPING) for key, entry in self._running.items()]
        self._running.clear()
        return stops

    def _targets(self, services: tuple[str, ...]) -> tuple[dict[str, DestinationTarget], list[str]]:
        targets: dict[str, DestinationTarget] = {}
        missing: list[str] = []
        # The single unnamed mapping (``--service 22``) serves a one-service tunnel.
        unnamed = self.services.get(V1_SERVICE) if len(self.services) == 1 else None
        for service in services:
            target = self.services.get(service)
            if target is None and unnamed is not None and len(services) == 1:
                target = unnamed
            if target is None:
                missing.append(service)
            else:
                targets[service] = target
        return targets, missing

    def _remember(self, digest: str) -> None:
        self._seen[digest] = None
        while len(self._seen) > self._seen_limit:
            self._seen.popitem(last=False)
