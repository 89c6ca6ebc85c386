"""The tunnel protocol state machine (PROTOCOL.md 4), sans-I/O.

:class:`TunnelState` holds no socket and no event loop: the I/O layer feeds it
what happened (session up/lost, decoded messages, local connections opened,
data read, closed, connect results) and carries out the returned actions
(:mod:`localproxy.tunnel.actions`) and events (:mod:`localproxy.events`) in order.

Rules it implements, beyond the protocol guides' letter:

- Stream ids come from one counter per ``TunnelState`` (start at 1, never reset
  by a reconnect); connection ids count from 1 within a stream.
- Closing a local connection sends CONNECTION_RESET when the stream speaks
  connection ids (V3), except that a *source* whose stream loses its last
  connection sends STREAM_RESET (the stream ends; the next connection starts a
  new one, as ConnectionStart needs a live stream). V1/V2 streams send STREAM_RESET.
  A destination that fails to connect for a STREAM_START sends STREAM_RESET, for
  a CONNECTION_START CONNECTION_RESET.
- V1/V2 peers carry one connection per stream. A second local connection for a
  service whose stream is busy is *held* (accepted, not read) and gets the next
  stream when the current one ends: nothing is killed, nothing is lost.
- ``max_active_connections`` counts a service's live and held connections; one
  more is closed at once with a warning (source) or answered with a reset
  (destination).
- A DATA/reset for a stream that is not the service's active one is dropped,
  except that a destination answers DATA/CONNECTION_START for a stream it does
  not have, unless a newer STREAM_START replaced it, with one STREAM_RESET (see
  :meth:`TunnelState._answer_dead_stream`): a deviation from PROTOCOL.md 4.4,
  without which the source waits forever on a stream that ended only here.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterable

from localproxy.errors import ConfigError, LocalProxyError, ProtocolError
from localproxy.events import (
    ConnectionRejected,
    ConnectionReset,
    ConnectionStarted,
    StreamStarted,
    TunnelReady,
)
from localproxy.tunnel.actions import (
    Close,
    Connect,
    Fatal,
    Hold,
    Listen,
    Log,
    RestartSession,
    Send,
    SendData,
    StopListen,
    Write,
    control_frame,
)
from localproxy.tunnel.core import VERSIONS, Output, Stream, TunnelCore
from localproxy.tunnel.services import resolve_services
from localproxy.types import DestinationTarget, Mode, SourcePort, SourceUnixSocket
from localproxy.wire.codec import BytesLike, Message, MessageType

__all__ = ["TunnelState", "VERSIONS"]


class TunnelState(TunnelCore):
    """One local proxy's view of the tunnel: services, streams, connections."""

    # --- session -------------------------------------------------------------

    def session_started(self, subprotocol: str) -> Output:
        version = VERSIONS.get(subprotocol)
        if version is None:
            return [Fatal(ProtocolError(f"Unsupported subprotocol '{subprotocol}'"))]
        self._version = version
        self._broken = False
        if version == 1:  # no SERVICE_IDS on V1: the single mapping is served at once
            return self._apply_service_ids(None)
        return []

    def session_lost(self) -> Output:
        """The websocket is gone: every stream is dead; abort every local connection.

        Aborted at once, not closed after a flush: a socket whose reader stalls
        must not linger half-dead (up to the flush timeout) after its session.
        """
        out: Output = [Close(key, False) for key in self._connections]
        self._connections.clear()
        self._streams.clear()
        self._held.clear()
        # A new session starts afresh: resets sent on the old websocket may be lost.
        self._latest_start.clear()
        self._reset_sent.clear()
        self._version = 0
        self._broken = False
        return out

    def data_error(self, error: LocalProxyError) -> Output:
        """Undecodable bytes, a text frame, a protocol violation: restart or stop."""
        self._broken = True
        self._drop("protocol_error")
        if self._reconnect_on_data_error:
            return [
                Log(logging.ERROR, f"Tunnel data error, restarting the session: {error}"),
                RestartSession(error),
            ]
        return [Fatal(error)]

    # --- messages from the tunnel ---------------------------------------------

    def receive(self, messages: Iterable[Message]) -> Output:
        out: Output = []
        for message in messages:
            if self._broken or not self._version:
                break
            kind = message.type
            try:
                if kind == MessageType.DATA:
                    self._on_data(message, out)
                elif kind == MessageType.STREAM_RESET or kind == MessageType.CONNECTION_RESET:
                    self._on_reset(message, out)
                elif kind == MessageType.STREAM_START:
                    self._on_stream_start(message, out)
                elif kind == MessageType.CONNECTION_START:
                    self._on_connection_start(message, out)
                elif kind == MessageType.SESSION_RESET:
                    self._close_all_streams("peer", out)
                elif kind == MessageType.SERVICE_IDS:
                    out += self._apply_service_ids(message.available_service_ids)
                elif message.ignorable:
                    self._drop("unknown_type")
                    out.append(
                        Log(logging.DEBUG, f"Ignoring message of unknown type {int(kind)} (ignorable)")
                    )
                else:
                    raise ProtocolError(
                        f"Received a message of unknown type {int(kind)} that is not ignorable"
                    )
            except ProtocolError as error:
                out += self.data_error(error)
        return out

    def _service_of(self, wire_service_id: str) -> str | None:
        return self._aliases.get(wire_service_id)

    def _stream_of(self, message: Message) -> Stream | None:
        if message.stream_id == 0:
            raise ProtocolError(f"Received {MessageType(message.type).name} with stream id 0")
        service = self._aliases.get(message.service_id)
        stream = self._streams.get(service) if service is not None else None
        if stream is None or stream.stream_id != message.stream_id:
            self._drop("unknown_service" if service is None else "stale_stream")
            return None  # stale or unknown: dropped silently
        return stream

    def _on_data(self, message: Message, out: Output) -> None:
        stream = self._stream_of(message)
        if stream is None:
            if self.mode is Mode.DESTINATION:
                self._answer_dead_stream(message, out)
            return
        conn = stream.connections.get((message.connection_id or 1) if stream.uses_connection_ids else 1)
        payload = message.payload
        if conn is None:
            self._drop("unknown_connection")
        elif (payload.nbytes if isinstance(payload, memoryview) else len(payload)):
            out.append(Write(conn.key, payload))

    def _on_reset(self, message: Message, out: Output) -> None:
        stream = self._stream_of(message)
        if stream is None:
            return
        if message.type == MessageType.STREAM_RESET or not stream.uses_connection_ids:
            self._end_stream(stream, "peer", out)
            return
        conn = stream.connections.pop(message.connection_id or 1, None)
        if conn is None:
            self._drop("unknown_connection")
            return
        del self._connections[conn.key]
        out.append(Close(conn.key, True))
        out.append(ConnectionReset(stream.service_id, stream.stream_id, conn.connection_id, "peer"))
        if self.mode is Mode.SOURCE and not stream.connections:
            self._end_stream(stream, "local", out)  # ConnectionStart needs a live stream: start anew

    def _on_stream_start(self, message: Message, out: Output) -> None:
        if self.mode is Mode.SOURCE:
            raise ProtocolError("Received STREAM_START in source mode (only a source starts streams)")
        if message.stream_id == 0:
            raise ProtocolError("Received STREAM_START with stream id 0")
        service = self._service_of(message.service_id)
        if service is None:
            self._drop("unknown_service")
            out.append(
                Log(logging.WARNING, f"Ignoring STREAM_START for unknown service '{message.service_id}'")
            )
            return
        self._latest_start[service] = message.stream_id
        old = self._streams.get(service)
        if old is not None:
            self._end_stream(old, "replaced", out)
        uses_ids = self._version >= 3 and message.connection_id != 0  # none: the peer is V2
        stream = Stream(service, message.stream_id, message.service_id, uses_ids)
        self._streams[service] = stream
        out.append(StreamStarted(service, stream.stream_id))
        self._open_destination(stream, message.connection_id or 1, True, out)

    def _on_connection_start(self, message: Message, out: Output) -> None:
        stream = self._stream_of(message)
        if self.mode is Mode.SOURCE:
            # The guide: a source treats it as an error on that connection only.
            conn = stream.connections.get(message.connection_id or 1) if stream is not None else None
            if conn is not None:
                out.append(Close(conn.key, False))
                out += self.local_closed(conn.key)
            return
        if stream is None:
            self._answer_dead_stream(message, out)
            return
        if not stream.uses_connection_ids:
            self._drop("connection_start_without_ids")
            return
        connection_id = message.connection_id or 1
        existing = stream.connections.pop(connection_id, None)
        if existing is not None:  # the guide: an error; reset that connection id
            del self._connections[existing.key]
            out.append(Close(existing.key, True))
            self._send_reset(stream, connection_id, False, out, existing.key)
            out.append(ConnectionReset(stream.service_id, stream.stream_id, connection_id, "local"))
            return
        self._open_destination(stream, connection_id, False, out)

    def _answer_dead_stream(self, message: Message, out: Output) -> None:
        """Destination: DATA/CONNECTION_START for a stream that is not active here.

        PROTOCOL.md 4.4 drops such frames silently. But when the stream ended here
        only (the service sent its STREAM_RESET to this side alone) or never began
        here (its STREAM_START was dropped while this side was reconnecting), the
        source still has it: its clients would wait forever and its next
        connections would join the dead stream. So answer STREAM_RESET (not
        CONNECTION_RESET: the whole stream is gone here, so every one of its
        connections at the source is affected, and exactly those close), once per
        stream id. Ids below the service's latest STREAM_START stay silent: the
        source replaced that stream itself, these frames were in flight. Resets are
        never answered (two proxies must not echo resets back and forth).
        """
        service = self._aliases.get(message.service_id)
        if service is None:
            return  # not a service of this tunnel: nothing the source could have started
        stream_id = message.stream_id
        if stream_id < self._latest_start.get(service, 0) or not self._remember_reset(service, stream_id):
            return
        out.append(Send(control_frame(MessageType.STREAM_RESET, stream_id, message.service_id)))
        out.append(
            Log(
                logging.INFO,
                f"Service '{service or '(default)'}': the peer sent {MessageType(message.type).name} for "
                f"stream {stream_id}, which is not active here; resetting it so the peer closes its connections",
            )
        )

    def _open_destination(
        self, stream: Stream, connection_id: int, started_stream: bool, out: Output
    ) -> None:
        service = stream.service_id
        if self.connection_count(service) >= self._max_connections:
            out.append(Log(logging.WARNING, self._limit_message(service)))
            out.append(ConnectionRejected(service, "max_active_connections reached"))
            self._send_reset(stream, connection_id, started_stream, out)
            if started_stream or not stream.uses_connection_ids:
                self._end_stream(stream, "local", out, send=False)
            return
        conn = self._new_connection(service)
        conn.connected = False
        conn.started_stream = started_stream
        self._attach(conn, stream, connection_id)
        out.append(ConnectionStarted(service, stream.stream_id, connection_id))
        target = self._targets[service] if self._targets is not None else None
        assert isinstance(target, DestinationTarget)
        out.append(Connect(conn.key, service, target))

    def _apply_service_ids(self, ids: Iterable[str] | None) -> Output:
        try:
            targets = resolve_services(
                self.mode, self._configured, None if ids is None else tuple(ids), unmapped=self._unmapped
            )
            if self.mode is Mode.SOURCE and self._client_version == 1 and len(targets) > 1:
                raise ConfigError(
                    f"Destination client type V1 carries a single service, but the tunnel has "
                    f"{len(targets)} ({', '.join(targets)}): drop -y V1 or use a tunnel with one service"
                )
        except ConfigError as error:
            return [Fatal(error)]
        out: Output = []
        for service in list(self._streams):
            if service not in targets:
                self._end_stream(self._streams[service], "session", out)
        self._targets = targets
        self._aliases = {service: service for service in targets}
        if len(targets) == 1 or self._version == 1:  # a V1 peer sends no service id
            self._aliases[""] = next(iter(targets))
        if self.mode is Mode.SOURCE:
            for service in sorted(self._listening - set(targets)):
                self._listening.discard(service)
                out.append(StopListen(service))
            for service, target in targets.items():
                if service in self._listening:
                    continue
                if isinstance(target, SourcePort):
                    out.append(Listen(service, target.port))
                elif isinstance(target, SourceUnixSocket):
                    out.append(Listen(service, 0, target.path))
                else:  # InProcess: no listener, open_connection() only
                    continue
                self._listening.add(service)
        out.append(TunnelReady(tuple(targets)))
        return out

    # --- local side ------------------------------------------------------------

    def local_opened(self, service_id: str) -> tuple[int, Output]:
        """Source: a local connection was accepted for ``service_id``; returns its key."""
        conn = self._new_connection(service_id)
        key = conn.key
        out: Output = []
        if not self.session_active or self._targets is None or service_id not in self._targets:
            del self._connections[key]
            message = f"No tunnel session for service '{service_id}' yet: closing the new connection"
            out.append(Log(logging.WARNING, message))
            out.append(ConnectionRejected(service_id, "no tunnel session"))
            out.append(Close(key, False))
            return key, out
        if self.connection_count(service_id) > self._max_connections:
            del self._connections[key]
            out.append(Log(logging.WARNING, self._limit_message(service_id)))
            out.append(ConnectionRejected(service_id, "max_active_connections reached"))
            out.append(Close(key, False))
            return key, out
        stream = self._streams.get(service_id)
        if stream is None:
            self._start_stream(conn, out)
        elif stream.uses_connection_ids:
            connection_id = stream.next_connection_id
            self._attach(conn, stream, connection_id)
            frame = control_frame(
                MessageType.CONNECTION_START, stream.stream_id, stream.wire_service_id, connection_id
            )
            out.append(Send(frame, key, service_id))
            out.append(ConnectionStarted(service_id, stream.stream_id, connection_id))
        else:
            self._held.setdefault(service_id, deque()).append(key)
            out.append(Hold(key))
            out.append(
                Log(
                    logging.INFO,
                    f"Service '{service_id}': the peer takes one connection at a time; "
                    "this one waits for the current one to end",
                )
            )
        return key, out

    def local_data(self, key: int, data: BytesLike) -> Output:
        conn = self._connections.get(key)
        if conn is None:
            return []
        framer = conn.framer
        if framer is None:  # held: keep it for when its stream starts
            conn.held_data.append(bytes(data))
            return []
        return [SendData(key, conn.service_id, framer, data)]

    def local_closed(self, key: int) -> Output:
        """A local connection ended (EOF, error): tell the peer. Unknown keys are ignored."""
        conn = self._connections.pop(key, None)
        if conn is None:
            return []
        out: Output = []
        stream = conn.stream
        if stream is None:  # held: never announced
            held = self._held.get(conn.service_id)
            if held is not None and key in held:
                held.remove(key)
            return out
        del stream.connections[conn.connection_id]
        last = not stream.connections
        if stream.uses_connection_ids and not (self.mode is Mode.SOURCE and last):
            self._send_reset(stream, conn.connection_id, False, out, key)
            out.append(ConnectionReset(stream.service_id, stream.stream_id, conn.connection_id, "local"))
        else:
            self._end_stream(stream, "local", out)
        return out

    def connect_result(self, key: int, ok: bool) -> Output:
        """Destination: the ``Connect`` for ``key`` succeeded or failed (after its retries)."""
        conn = self._connections.get(key)
        if conn is None:
            return [Close(key, False)] if ok else []  # reset meanwhile: drop the new socket
        if ok:
            conn.connected = True
            return []
        stream = conn.stream
        assert stream is not None
        out: Output = [ConnectionRejected(conn.service_id, "local connect failed")]
        if conn.started_stream or not stream.uses_connection_ids:
            del self._connections[key]
            del stream.connections[conn.connection_id]
            self._end_stream(stream, "local", out)
        else:
            out += self.local_closed(key)
        return out
