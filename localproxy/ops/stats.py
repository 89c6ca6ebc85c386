"""Operational counters of a :class:`~localproxy.proxy.local_proxy.LocalProxy`, readable without scraping.

``proxy.stats()`` returns a :class:`ProxyStats`: a frozen snapshot of plain
numbers, cheap to take and safe to keep. The counters behind it cost nearly
nothing where traffic flows: bytes are summed with one ``+=`` per local read and
per tunnel DATA write (``Engine.bytes_sent`` / ``bytes_received``), frames the
sans-I/O tunnel drops are counted by rule (``TunnelCore.dropped``), and session
and connection counts come from the events the proxy emits anyway
(:meth:`ProxyCounters.on_event`). The Prometheus exporter
(``localproxy.ops.metrics``) reads these snapshots at scrape time.

No token (access or client) is ever part of a snapshot: the tunnel is named by
:func:`~localproxy.config.proxy_config.tunnel_label` (the tunnel id when known, else mode and endpoint) or by the
name the embedder gave.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import field
from types import MappingProxyType
from typing import Any

from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    HandshakeRejectedError,
    LocalProxyError,
    ServiceUnavailableError,
)
from localproxy.events import (
    Connected,
    ConnectionRejected,
    ConnectionStarted,
    Disconnected,
    Event,
)
from localproxy.records import record

__all__ = ["REFUSAL_CLASSES", "ProxyCounters", "ProxyStats", "refusal_class"]

# Handshake refusals, by what the operator has to do about them.
REFUSAL_CLASSES = ("used_token", "client_token_mismatch", "other_4xx", "5xx")


def refusal_class(error: HandshakeRejectedError) -> str:
    """One of :data:`REFUSAL_CLASSES` for a refused websocket upgrade."""
    if isinstance(error, AccessTokenUsedError):
        return "used_token"
    if isinstance(error, ClientTokenMismatchError):
        return "client_token_mismatch"
    if isinstance(error, ServiceUnavailableError) or error.status >= 500:
        return "5xx"
    return "other_4xx"


def _frozen(mapping: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(mapping))


@record(frozen=True)
class ProxyStats:
    """One proxy's counters at one moment. Per-service maps are keyed by service id
    ("" for the single unnamed V1 mapping). Totals count since the proxy started."""

    tunnel: str  # the label (see tunnel_label), never a token
    mode: str  # "source" or "destination"
    connected: bool  # a websocket session is up now
    services: tuple[str, ...]  # served service ids (the tunnel's once known, else the configured ones)
    sessions: int  # websocket sessions established
    reconnects: int  # sessions established after the first
    handshake_refusals: Mapping[str, int]  # REFUSAL_CLASSES -> count
    connect_failures: int  # attempts lost to network, TLS or proxy errors
    active_connections: Mapping[str, int]  # service -> local connections open now
    connections: Mapping[str, int]  # service -> local connections started
    connections_rejected: Mapping[str, int]  # reason -> local connections refused
    bytes_received: Mapping[str, int]  # service -> bytes from the tunnel, written to local apps
    bytes_sent: Mapping[str, int]  # service -> bytes read from local apps, sent into the tunnel
    frames_dropped: Mapping[str, int]  # rule -> tunnel frames dropped (see TunnelCore.dropped)
    ping_rtt: float | None  # seconds, of the last websocket ping answered; None if unknown


@record
class ProxyCounters:
    """The session-level counters a LocalProxy keeps (updated from its events)."""

    connected: bool = False
    sessions: int = 0
    connect_failures: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_CLASSES, 0))
    connections: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    rejected: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def on_event(self, event: Event) -> None:
        kind = event.__class__
        if kind is ConnectionStarted:
            self.connections[event.service_id] += 1  # type: ignore[union-attr]
        elif kind is Connected:
            self.connected = True
            self.sessions += 1
        elif kind is Disconnected:
            self.connected = False
        elif kind is ConnectionRejected:
            self.rejected[event.reason] += 1  # type: ignore[union-attr]

    def on_connect_error(self, error: LocalProxyError) -> None:
        """A connection attempt failed: a refused handshake or a network error."""
        if isinstance(error, HandshakeRejectedError):
            self.refusals[refusal_class(error)] += 1
        else:
            self.connect_failures += 1

    def snapshot(
        self,
        tunnel: str,
        mode: str,
        *,
        services: tuple[str, ...],
        active: Mapping[str, int],
        received: Mapping[str, int],
        sent: Mapping[str, int],
        dropped: Mapping[str, int],
        ws: Any = None,
    ) -> ProxyStats:
        latency = getattr(ws, "latency", None) if ws is not None else None
        return ProxyStats(
            tunnel=tunnel,
            mode=mode,
            connected=self.connected,
            services=services,
            sessions=self.sessions,
            reconnects=max(self.sessions - 1, 0),
            handshake_refusals=_frozen(self.refusals),
            connect_failures=self.connect_failures,
            active_connections=_frozen(active),
            connections=_frozen(self.connections),
            connections_rejected=_frozen(self.rejected),
            bytes_received=_frozen(received),
            bytes_sent=_frozen(sent),
            frames_dropped=_frozen(dropped),
            # websockets reports 0 until a ping was answered: unknown, not instant.
            ping_rtt=float(latency) if isinstance(latency, (int, float)) and latency > 0 else None,
        )


@record(frozen=True)
class AgentStats:
    """A :class:`~localproxy.agent.DeviceAgent`'s counters and its proxies' snapshots."""

    mqtt_connected: bool
    tunnels: int  # tunnels served now
    proxies_started: int
    # (outcome, reason) -> notifications; outcome: accepted, ignored or rejected.
    notifications: Mapping[tuple[str, str], int]
    proxies: tuple[ProxyStats, ...]
