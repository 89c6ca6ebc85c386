"""Typed events a :class:`~localproxy.proxy.local_proxy.LocalProxy` hands to its subscribers.

``proxy.subscribe(callback)`` calls ``callback(event)`` synchronously, in the
event loop, for each of these. They are plain frozen dataclasses: compare them,
log them, put them in a queue. The sans-I/O tunnel (``localproxy.tunnel.state``) emits
the stream/connection ones; the proxy emits the session ones.
"""

from __future__ import annotations

from typing import Literal, Union

from localproxy.errors import LocalProxyError
from localproxy.records import record

# Who ended a stream or connection: this proxy's local side ("local"), the tunnel
# peer or service ("peer"), or a newer STREAM_START for the same service ("replaced").
Initiator = Literal["local", "peer", "replaced", "session"]


@record(frozen=True)
class Connected:
    """A websocket session to the service is up."""

    channel_id: str | None
    subprotocol: str


@record(frozen=True)
class Disconnected:
    """The websocket session ended; ``reason`` is human-readable."""

    reason: str


@record(frozen=True)
class TunnelReady:
    """The tunnel's services are known and checked (SERVICE_IDS, or at once on V1).

    ``services`` are the service ids served, as they appear on the wire ("" for a
    tunnel without services or a V1 session).
    """

    services: tuple[str, ...]


@record(frozen=True)
class Listening:
    """Source mode: a local port (or the Unix socket ``path``, port 0) accepts
    connections for ``service_id``."""

    service_id: str
    port: int
    path: str | None = None


@record(frozen=True)
class StreamStarted:
    service_id: str
    stream_id: int


@record(frozen=True)
class StreamReset:
    service_id: str
    stream_id: int
    initiator: Initiator


@record(frozen=True)
class ConnectionStarted:
    service_id: str
    stream_id: int
    connection_id: int


@record(frozen=True)
class ConnectionReset:
    service_id: str
    stream_id: int
    connection_id: int
    initiator: Initiator


@record(frozen=True)
class ConnectionRejected:
    """A local connection was refused (no session, limit reached, connect failed)."""

    service_id: str
    reason: str


@record(frozen=True)
class ErrorEvent:
    """An error: fatal ones stop the proxy, others restart the session."""

    error: LocalProxyError
    fatal: bool = True


Event = Union[
    Connected,
    Disconnected,
    TunnelReady,
    Listening,
    StreamStarted,
    StreamReset,
    ConnectionStarted,
    ConnectionReset,
    ConnectionRejected,
    ErrorEvent,
]

__all__ = [
    "Connected",
    "ConnectionRejected",
    "ConnectionReset",
    "ConnectionStarted",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "Initiator",
    "Listening",
    "StreamReset",
    "StreamStarted",
    "TunnelReady",
]
