"""What the sans-I/O tunnel asks the I/O layer to do, and its frame builders.

The tunnel's inputs return a list of these actions, to be carried out in order.
Events from :mod:`localproxy.events` appear in the same list (to be handed to
subscribers) so their order relative to the actions is kept.

DATA frames carry ``serviceId`` on V2/V3 (the service disconnects a client whose
DATA lacks it once its streams have one), which ``codec.encode_data_frame`` has
no parameter for: :class:`DataFramer` prebuilds each connection's header fields
once with ``codec.encode_frame`` and only adds the payload length per frame.
"""

from __future__ import annotations

from localproxy.errors import LocalProxyError
from localproxy.records import record
from localproxy.types import DestinationTarget
from localproxy.wire.codec import BytesLike, Message, MessageType, encode_frame
from localproxy.wire.varint import encode_length_varint

__all__ = [
    "Action",
    "Close",
    "Connect",
    "DataFramer",
    "Fatal",
    "Hold",
    "Listen",
    "Log",
    "Release",
    "RestartSession",
    "Send",
    "SendData",
    "StopListen",
    "Write",
    "control_frame",
]


@record(slots=True)
class Send:
    """Send one control frame; its place in the order (see ``scheduler.py``):

    - ``key`` set: after everything queued for that local connection (``service_id`` is its service);
    - only ``service_id``: a stream-level frame, after everything its service queued so far;
    - neither: before everything (it concerns nothing queued).
    """

    frame: bytes
    key: int = 0
    service_id: str | None = None

    @property
    def parts(self) -> list[BytesLike]:
        return [self.frame]


@record(slots=True)
class SendData:
    """Send ``data`` of local connection ``key`` as DATA frames built by ``framer``."""

    key: int
    service_id: str
    framer: "DataFramer"
    data: BytesLike

    @property
    def parts(self) -> list[BytesLike]:
        """The frames as they would go out unscheduled (tests, tools)."""
        return self.framer.frames(self.data)


@record(slots=True)
class Write:
    """Write ``data`` to local connection ``key`` (buffer it if still connecting)."""

    key: int
    data: BytesLike


@record(slots=True)
class Close:
    """Close local connection ``key``: after writing what is queued if ``flush``, else abort."""

    key: int
    flush: bool = True


@record(slots=True)
class Connect:
    """Destination: open a local connection ``key`` to ``target``; report with ``connect_result``."""

    key: int
    service_id: str
    target: DestinationTarget


@record(slots=True)
class Hold:
    """Source: stop reading local connection ``key`` until :class:`Release` (V1/V2 queue)."""

    key: int


@record(slots=True)
class Release:
    """Source: resume reading a held local connection ``key``: its stream has started."""

    key: int


@record(slots=True)
class Listen:
    """Source: accept local connections for ``service_id`` on TCP ``port`` (0: pick one),
    or on the Unix socket ``unix_path`` when it is set."""

    service_id: str
    port: int
    unix_path: str | None = None


@record(slots=True)
class StopListen:
    service_id: str


@record(slots=True)
class Log:
    """A line for ``logging`` at ``level`` (a ``logging`` level number).

    ``key`` names the kind of line (its template) for the log rate limit: a peer can
    cause lines by the thousand, and ids in the text must not make each one new.
    Without a key, the text itself is the key.
    """

    level: int
    message: str
    key: str | None = None


@record(slots=True)
class Fatal:
    """Stop the proxy with this error (its message is for the user)."""

    error: LocalProxyError


@record(slots=True)
class RestartSession:
    """Drop this websocket session and reconnect (a data error with reconnect_on_data_error)."""

    error: LocalProxyError


Action = Send | SendData | Write | Close | Connect | Hold | Release | Listen | StopListen | Log | Fatal | RestartSession


def control_frame(kind: MessageType, stream_id: int, service_id: str = "", connection_id: int = 0) -> bytes:
    """One encoded control frame (STREAM_START, CONNECTION_START, *_RESET)."""
    return encode_frame(
        Message(type=kind, stream_id=stream_id, service_id=service_id, connection_id=connection_id)
    )


_PAYLOAD_TAG = b'"'  # field 4, length-delimited
_LENGTH_VARINTS: dict[int, bytes] = {}


class DataFramer:
    """DATA frames for one connection: ``frames(data)`` -> ``[header, chunk, ...]``.

    The fields before the payload (type, streamId, serviceId, connectionId) are
    encoded once; each frame adds the 2-byte length, the payload tag and length.
    Chunks are memoryview slices of ``data``: no payload copy here.
    """

    __slots__ = ("_fields", "_max_payload", "overhead")

    def __init__(self, stream_id: int, service_id: str, connection_id: int, max_payload: int) -> None:
        # encode_frame of a DATA message without payload = exactly those fields.
        self._fields = control_frame(MessageType.DATA, stream_id, service_id, connection_id)[2:]
        self._max_payload = max_payload
        # Frame bytes besides the payload, at most: length prefix, fields, tag, 3-byte varint.
        self.overhead = 2 + len(self._fields) + 1 + 3

    @property
    def max_payload(self) -> int:
        return self._max_payload

    def _header(self, size: int) -> bytes:
        length = _LENGTH_VARINTS.get(size)
        if length is None:
            length = _LENGTH_VARINTS.setdefault(size, encode_length_varint(size))  # sizes <= 64512: bounded
        fields = self._fields
        return (len(fields) + 1 + len(length) + size).to_bytes(2, "big") + fields + _PAYLOAD_TAG + length

    def frames(self, data: BytesLike) -> list[BytesLike]:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size <= self._max_payload:
            return [self._header(size), data] if size else []
        view = memoryview(data).cast("B")
        parts: list[BytesLike] = []
        step = self._max_payload
        for start in range(0, size, step):
            chunk = view[start : start + step]
            parts.append(self._header(len(chunk)))
            parts.append(chunk)
        return parts
