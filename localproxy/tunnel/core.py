"""State and bookkeeping shared by the tunnel state machine (see ``tunnel.py``).

:class:`TunnelCore` keeps the records (services, streams, connections, the V1/V2
hold queue) and the helpers that start and end streams; :class:`~localproxy.tunnel.state.TunnelState`
adds the inputs (session, messages from the tunnel, local events). Sans-I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping, Protocol, Self, Union

from localproxy.errors import ConfigError
from localproxy.events import (
    ConnectionStarted,
    Event,
    Initiator,
    StreamReset,
    StreamStarted,
)
from localproxy.settings import V1, V2, V3, Settings
from localproxy.tunnel.actions import (
    Action,
    Close,
    DataFramer,
    Release,
    Send,
    SendData,
    control_frame,
)
from localproxy.types import InProcess, Mode, ServiceTarget, SourcePort
from localproxy.wire.codec import BytesLike, MessageType

__all__ = ["Connection", "Output", "Stream", "TunnelCore", "VERSIONS"]

VERSIONS = {V1: 1, V2: 2, V3: 3}
# Destination: stream ids per service already told dead by a STREAM_RESET (sent or
# answered), so a stream's in-flight DATA draws one answer, not one per frame.
RESET_MEMORY = 64
_CLIENT_TYPES = {None: 3, "V3": 3, "V2": 2, "V1": 1}
Output = list[Union[Action, Event]]  # actions and events, in the order to carry out


class Stream:
    """The active stream of one service and its connections (connection id -> Connection)."""

    __slots__ = (
        "service_id",
        "stream_id",
        "wire_service_id",
        "uses_connection_ids",
        "connections",
        "next_connection_id",
    )

    def __init__(
        self, service_id: str, stream_id: int, wire_service_id: str, uses_connection_ids: bool
    ) -> None:
        self.service_id = service_id
        self.stream_id = stream_id
        self.wire_service_id = wire_service_id  # "" when the peer speaks without service ids
        self.uses_connection_ids = uses_connection_ids
        self.connections: dict[int, Connection] = {}
        self.next_connection_id = 1


class Connection:
    """One local connection: held (no stream yet) or attached to a stream."""

    __slots__ = (
        "key",
        "service_id",
        "stream",
        "connection_id",
        "framer",
        "connected",
        "started_stream",
        "held_data",
    )

    def __init__(self, key: int, service_id: str) -> None:
        self.key = key
        self.service_id = service_id
        self.stream: Stream | None = None  # None while held
        self.connection_id = 0
        self.framer: DataFramer | None = None
        self.connected = True  # destination: False until connect_result(ok)
        self.started_stream = False  # destination: opened by STREAM_START (vs CONNECTION_START)
        self.held_data: list[BytesLike] = []


class TunnelOptions(Protocol):
    """What :meth:`TunnelCore.from_config` reads: a ``ProxyConfig`` has it (the
    configuration layer sits above this one, so the type is stated here)."""

    @property
    def mode(self) -> Mode: ...
    @property
    def services(self) -> Mapping[str, ServiceTarget]: ...
    @property
    def destination_client_type(self) -> str | None: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def listen_unmapped(self) -> bool: ...


class TunnelCore:
    """Records and stream bookkeeping of one local proxy's tunnel."""

    def __init__(
        self,
        mode: Mode,
        services: Mapping[str, ServiceTarget],
        *,
        destination_client_type: str | None = None,
        max_active_connections: int = 128,
        max_payload_size: int = 64512,
        reconnect_on_data_error: bool = True,
        listen_unmapped: bool = True,
    ) -> None:
        if destination_client_type not in _CLIENT_TYPES:
            raise ConfigError(f"Unknown destination client type '{destination_client_type}': use V1 or V2")
        if not 0 < max_payload_size <= 64512:
            raise ConfigError(f"max_payload_size must be within 1..64512, got {max_payload_size}")
        self.mode = mode
        self._configured = dict(services)
        self._client_version = _CLIENT_TYPES[destination_client_type] if mode is Mode.SOURCE else 3
        self._max_connections = max_active_connections
        self._max_payload = max_payload_size
        self._reconnect_on_data_error = reconnect_on_data_error
        # Source: a tunnel service with no mapping gets a picked port, or no listener.
        self._unmapped: ServiceTarget = SourcePort(0) if listen_unmapped else InProcess()
        self._next_stream_id = 1
        self._next_key = 1
        self._version = 0  # negotiated: 1, 2 or 3; 0 = no session
        self._broken = False  # a data error ended this session: ignore input until session_lost
        self._targets: dict[str, ServiceTarget] | None = None
        self._aliases: dict[str, str] = {}  # wire service id -> served service id
        self._listening: set[str] = set()
        self._streams: dict[str, Stream] = {}
        self._connections: dict[int, Connection] = {}
        self._held: dict[str, deque[int]] = {}
        # Destination, this session: the stream id of each service's latest STREAM_START
        # and the ids it sent STREAM_RESET for (see TunnelState._answer_dead_stream).
        self._latest_start: dict[str, int] = {}
        self._reset_sent: dict[str, deque[int]] = {}
        # Frames from the tunnel not acted on, by rule (read by LocalProxy.stats()).
        self.dropped: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: TunnelOptions) -> Self:
        settings = config.settings
        return cls(
            config.mode,
            config.services,
            destination_client_type=config.destination_client_type if config.mode is Mode.SOURCE else None,
            max_active_connections=settings.tcp_max_active_connections,
            max_payload_size=settings.max_payload_size,
            reconnect_on_data_error=settings.reconnect_on_data_error,
            listen_unmapped=config.listen_unmapped,
        )

    # --- views ---------------------------------------------------------------

    @property
    def session_active(self) -> bool:
        return self._version != 0 and not self._broken

    @property
    def services(self) -> dict[str, ServiceTarget] | None:
        """The served ``{wire service id: target}`` once known, else None."""
        return None if self._targets is None else dict(self._targets)

    def active_stream(self, service_id: str) -> int | None:
        stream = self._streams.get(service_id)
        return None if stream is None else stream.stream_id

    def served_service(self, name: str | None) -> str | None:
        """The served service id a local user means by ``name`` (None: the only one), or None.

        A V1 session serves its single mapping as "", and a single unnamed mapping
        serves the tunnel's one service under its name: either name reaches it.
        """
        targets = self._targets
        if targets is None:
            return None
        if name is not None and name in targets:
            return name
        if len(targets) == 1 and (name is None or name == "" or name in self._configured):
            return next(iter(targets))
        return None

    def connection_count(self, service_id: str | None = None) -> int:
        if service_id is None:
            return len(self._connections)
        return sum(1 for conn in self._connections.values() if conn.service_id == service_id)

    def connections_by_service(self) -> dict[str, int]:
        """Service id -> local connections open (live or held) now."""
        counts: dict[str, int] = {}
        for conn in self._connections.values():
            counts[conn.service_id] = counts.get(conn.service_id, 0) + 1
        return counts

    def connection_ids(self, key: int) -> tuple[str, int, int] | None:
        """``(service id, stream id, connection id)`` of a live connection; None if held/unknown."""
        conn = self._connections.get(key)
        if conn is None or conn.stream is None:
            return None
        return conn.service_id, conn.stream.stream_id, conn.connection_id

    # --- helpers -----------------------------------------------------------------

    def _drop(self, rule: str) -> None:
        self.dropped[rule] = self.dropped.get(rule, 0) + 1

    def _new_connection(self, service_id: str) -> Connection:
        conn = Connection(self._next_key, service_id)
        self._next_key += 1
        self._connections[conn.key] = conn
        return conn

    def _attach(self, conn: Connection, stream: Stream, connection_id: int) -> None:
        conn.stream = stream
        conn.connection_id = connection_id
        stream.connections[connection_id] = conn
        stream.next_connection_id = max(stream.next_connection_id, connection_id + 1)
        conn.framer = DataFramer(
            stream.stream_id,
            stream.wire_service_id,
            connection_id if stream.uses_connection_ids else 0,
            self._max_payload,
        )

    def _start_stream(self, conn: Connection, out: Output) -> None:
        """Source: a new stream for ``conn`` (STREAM_START, then any data it had while held)."""
        service = conn.service_id
        peer_version = min(self._version, self._client_version)
        stream = Stream(
            service, self._next_stream_id, service if peer_version >= 2 else "", peer_version >= 3
        )
        self._next_stream_id += 1
        self._streams[service] = stream
        self._attach(conn, stream, 1)
        connection_id = 1 if stream.uses_connection_ids else 0
        start = control_frame(
            MessageType.STREAM_START, stream.stream_id, stream.wire_service_id, connection_id
        )
        out.append(Send(start, service_id=service))
        out.append(StreamStarted(service, stream.stream_id))
        if stream.uses_connection_ids:
            out.append(ConnectionStarted(service, stream.stream_id, 1))
        framer = conn.framer
        assert framer is not None
        for data in conn.held_data:
            out.append(SendData(conn.key, service, framer, data))
        conn.held_data = []

    def _send_reset(
        self, stream: Stream, connection_id: int, whole_stream: bool, out: Output, key: int = 0
    ) -> None:
        """STREAM_RESET (after everything the service queued), or CONNECTION_RESET (after
        what connection ``key`` queued; with no key, after what the service queued)."""
        if whole_stream or not stream.uses_connection_ids:
            frame = control_frame(MessageType.STREAM_RESET, stream.stream_id, stream.wire_service_id)
            if self.mode is Mode.DESTINATION:
                self._remember_reset(stream.service_id, stream.stream_id)
            key = 0
        else:
            frame = control_frame(
                MessageType.CONNECTION_RESET, stream.stream_id, stream.wire_service_id, connection_id
            )
        out.append(Send(frame, key, stream.service_id))

    def _remember_reset(self, service_id: str, stream_id: int) -> bool:
        """Record that ``stream_id`` was reset; False if it already was (bounded memory)."""
        sent = self._reset_sent.get(service_id)
        if sent is None:
            sent = self._reset_sent[service_id] = deque(maxlen=RESET_MEMORY)
        elif stream_id in sent:
            return False
        sent.append(stream_id)
        return True

    def _end_stream(self, stream: Stream, initiator: Initiator, out: Output, *, send: bool = True) -> None:
        """Close every connection of ``stream`` and forget it; STREAM_RESET if we end it."""
        if self._streams.get(stream.service_id) is stream:
            del self._streams[stream.service_id]
        for conn in stream.connections.values():
            self._connections.pop(conn.key, None)
            out.append(Close(conn.key, True))
        stream.connections.clear()
        if initiator == "local" and send:
            self._send_reset(stream, 0, True, out)
        out.append(StreamReset(stream.service_id, stream.stream_id, initiator))
        if self.mode is Mode.SOURCE and self.session_active:
            self._start_next_held(stream.service_id, out)

    def _start_next_held(self, service: str, out: Output) -> None:
        held = self._held.get(service)
        while held:
            conn = self._connections.get(held.popleft())
            if conn is not None:
                self._start_stream(conn, out)
                out.append(Release(conn.key))
                return

    def _close_all_streams(self, initiator: Initiator, out: Output) -> None:
        for stream in list(self._streams.values()):
            self._end_stream(stream, initiator, out)

    def _limit_message(self, service: str) -> str:
        return (
            f"Service '{service or '(default)'}' already has {self._max_connections} active connections "
            "(tcp.max_active_connections): closing the new one"
        )
