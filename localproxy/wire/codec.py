"""Tunnel frames <-> ``Message``: the Secure Tunneling wire codec (PROTOCOL.md 3).

A tunnel frame is a 2-byte big-endian length followed by that many bytes of one
protobuf ``Message``. The protobuf wire format of this one small schema is encoded
and decoded by hand (no google.protobuf on the hot path):

- ``encode_frame`` writes fields in field-number order and omits proto3 defaults, so
  its body is byte-identical to ``Message_pb2.Message(...).SerializeToString()``.
- ``encode_data_frame`` is the DATA fast path. It returns ``(header, payload)`` so a
  payload is never copied before the final join/send. To keep that two-part shape the
  header carries ``serviceId`` (field 5) and ``connectionId`` (field 7) *before* the
  payload (field 4): valid protobuf that every parser reads as the same message, but
  byte-identical to ``encode_frame`` only when both are unset.
- ``FrameDecoder`` accepts fields in any order, keeps the last value of a repeated
  scalar field, skips unknown fields (varint, fixed64, length-delimited, groups,
  fixed32) and flags them in ``Message.has_unknown_fields``. Stricter than protobuf:
  a known field with the wrong wire type is a ``ProtocolError`` (protobuf would keep
  it as an unknown field). ``int32`` fields keep the low 32 bits, signed, and
  ``uint32`` the low 32 bits, as protobuf does. An unknown ``type`` value is kept as
  a plain ``int`` (the caller applies the ``ignorable`` rule); type 0 is an error.
  DATA frames in the layouts real peers send are decoded by an inline fast path
  (``frames.py``), everything else by a general parser (``decode.py``).
- Decoded payloads are ``memoryview`` slices of the fed ``bytes`` (zero copy: a
  63 KiB payload is never copied by the decoder), or ``b""`` when absent.
  ``bytes(msg.payload)``, ``len()``, ``b"".join`` and ``msg.payload == b"..."``
  work; a payload keeps the websocket message it came from alive while referenced.

Every error is a ``localproxy.errors.ProtocolError`` whose message says what is wrong.
"""

from __future__ import annotations

import struct

from localproxy.errors import ProtocolError
from localproxy.wire.frames import FrameDecoder
from localproxy.wire.message import (
    MAX_FRAME_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_WS_MESSAGE,
    BytesLike,
    Message,
    MessageType,
)
from localproxy.wire.varint import (
    VARINT1,
    VARINT_HIGH,
    VARINT_LOW,
    encode_length_varint,
    encode_varint,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_WS_MESSAGE",
    "BytesLike",
    "FrameDecoder",
    "Message",
    "MessageType",
    "encode_data_frame",
    "encode_data_frames",
    "encode_frame",
]


# --- encoding -----------------------------------------------------------------


def _check_int32(name: str, value: int) -> None:
    if not -0x80000000 <= value <= 0x7FFFFFFF:
        raise ProtocolError(f"{name} {value} is out of the int32 range")


def _check_uint32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ProtocolError(f"{name} {value} is out of the uint32 range")


def encode_frame(message: Message) -> bytes:
    """Encode ``message`` as one tunnel frame: 2-byte length + protobuf body.

    Raises ``ProtocolError`` for a payload over ``MAX_PAYLOAD_SIZE``, a body over
    ``MAX_FRAME_SIZE`` or a field value out of its protobuf range.
    """
    payload = message.payload
    if message.type is _DATA and payload and not message.ignorable and not message.available_service_ids:
        # fast path: type, streamId, payload, serviceId, connectionId
        key = (message.stream_id, message.connection_id, message.service_id)
        parts = _DATA_PARTS_CACHE.get(key) or _data_parts(*key)
        head = parts[0]
        trailer = parts[1]
        size = len(payload) if payload.__class__ is not memoryview else payload.nbytes
        if size < 0x80:
            body_size = len(head) + 1 + size + len(trailer)
            if body_size <= MAX_FRAME_SIZE:
                return b"".join((_pack_prefix(body_size), head, VARINT1[size], payload, trailer))
        elif size <= MAX_PAYLOAD_SIZE:
            high = VARINT_HIGH[size >> 7]
            body_size = len(head) + 1 + len(high) + size + len(trailer)
            if body_size <= MAX_FRAME_SIZE:
                return b"".join((_pack_prefix(body_size), head, VARINT_LOW[size & 0x7F], high, payload, trailer))
    return _encode_general(message)  # also raises the size errors


def _encode_general(message: Message) -> bytes:
    parts: list[BytesLike] = [b""]  # [0] becomes the length prefix
    type_value = int(message.type)
    if type_value:
        _check_int32("type", type_value)
        parts.append(b"\x08" + encode_varint(type_value))
    stream_id = message.stream_id
    if stream_id:
        _check_int32("stream_id", stream_id)
        parts.append(b"\x10" + encode_varint(stream_id))
    if message.ignorable:
        parts.append(b"\x18\x01")
    payload = message.payload
    payload_size = _byte_size(payload)
    if payload_size:
        if payload_size > MAX_PAYLOAD_SIZE:
            raise _payload_too_large(payload_size)
        parts.append(b'"' + encode_length_varint(payload_size))
    headers_size = sum(map(len, parts))
    tail: list[bytes] = []
    if message.service_id:
        raw = message.service_id.encode()
        tail.append(b"*" + encode_length_varint(len(raw)) + raw)
    for service_id in message.available_service_ids:
        raw = service_id.encode()
        tail.append(b"2" + encode_length_varint(len(raw)) + raw)
    connection_id = message.connection_id
    if connection_id:
        _check_uint32("connection_id", connection_id)
        tail.append(b"8" + encode_varint(connection_id))
    body_size = headers_size + payload_size + sum(map(len, tail))
    if body_size > MAX_FRAME_SIZE:
        raise ProtocolError(f"message of {body_size} bytes exceeds the {MAX_FRAME_SIZE}-byte frame limit")
    parts[0] = _pack_prefix(body_size)
    if payload_size:
        parts.append(payload)
    parts += tail
    return b"".join(parts)


def _byte_size(data: BytesLike) -> int:
    return data.nbytes if data.__class__ is memoryview else len(data)


def _payload_too_large(size: int) -> ProtocolError:
    return ProtocolError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD_SIZE}-byte limit")


_DATA = MessageType.DATA
_pack_prefix = struct.Struct(">H").pack

# Encoded DATA fields per (stream_id, connection_id, service_id), validated once:
# (protobuf-order head "08 01 [10 sid] 22", its trailer "[2a n serviceId] [38 cid]",
#  encode_data_frame's head "08 01 [10 sid] [2a n serviceId] [38 cid] 22").
# Bounded so that a long-lived tunnel with ever new stream ids cannot grow it forever.
_DATA_PARTS_CACHE: dict[tuple[int, int, str], tuple[bytes, bytes, bytes]] = {}
_DATA_PARTS_CACHE_LIMIT = 4096


def _data_parts(stream_id: int, connection_id: int, service_id: str) -> tuple[bytes, bytes, bytes]:
    key = (stream_id, connection_id, service_id)
    parts = _DATA_PARTS_CACHE.get(key)
    if parts is None:
        _check_int32("stream_id", stream_id)
        _check_uint32("connection_id", connection_id)
        start = b"\x08\x01" + (b"\x10" + encode_varint(stream_id) if stream_id else b"")
        trailer = b""
        if service_id:
            raw = service_id.encode()
            trailer = b"*" + encode_length_varint(len(raw)) + raw
        if connection_id:
            trailer += b"8" + encode_varint(connection_id)
        parts = (start + b'"', trailer, start + trailer + b'"')
        if len(service_id) <= 256:  # real service ids are short; odd ones are not kept
            if len(_DATA_PARTS_CACHE) >= _DATA_PARTS_CACHE_LIMIT:
                _DATA_PARTS_CACHE.clear()
            _DATA_PARTS_CACHE[key] = parts
    return parts


def encode_data_frame(
    stream_id: int, connection_id: int, payload: BytesLike, service_id: str = ""
) -> tuple[bytes, BytesLike]:
    """Encode a DATA frame as ``(header, payload)`` without copying ``payload``.

    ``header`` holds the length prefix and every field up to the payload's length
    varint (``serviceId`` and ``connectionId`` included: they come before the
    payload, see the module docstring). A memoryview payload must be a contiguous
    byte view.
    """
    key = (stream_id, connection_id, service_id)
    middle = (_DATA_PARTS_CACHE.get(key) or _data_parts(*key))[2]
    size = len(payload) if payload.__class__ is not memoryview else payload.nbytes
    if size < 0x80:
        body_size = len(middle) + 1 + size
        length: bytes = VARINT1[size]
        if not size:  # proto3 omits an empty payload: drop the payload tag
            middle = middle[:-1]
            body_size = len(middle)
            length = b""
    elif size <= MAX_PAYLOAD_SIZE:
        high = VARINT_HIGH[size >> 7]
        body_size = len(middle) + 1 + len(high) + size
        length = VARINT_LOW[size & 0x7F] + high
    else:
        raise _payload_too_large(size)
    if body_size > MAX_FRAME_SIZE:
        raise ProtocolError(f"message of {body_size} bytes exceeds the {MAX_FRAME_SIZE}-byte frame limit")
    return b"".join((_pack_prefix(body_size), middle, length)), payload


def encode_data_frames(
    stream_id: int,
    connection_id: int,
    data: BytesLike,
    max_payload: int = MAX_PAYLOAD_SIZE,
    service_id: str = "",
) -> list[BytesLike]:
    """Split ``data`` into DATA frames of at most ``max_payload`` bytes each.

    Returns the flat list ``[header1, chunk1, header2, chunk2, ...]`` ready for
    ``b"".join``; chunks are memoryview slices of ``data`` (no copy). Empty ``data``
    gives an empty list.
    """
    if not 0 < max_payload <= MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"max_payload must be within 1..{MAX_PAYLOAD_SIZE}, got {max_payload}")
    view = data if data.__class__ is memoryview else memoryview(data)
    total = view.nbytes
    if total <= max_payload:
        return list(encode_data_frame(stream_id, connection_id, data, service_id)) if total else []
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    parts: list[BytesLike] = []
    for start in range(0, total, max_payload):
        chunk = view[start : start + max_payload]
        parts.extend(encode_data_frame(stream_id, connection_id, chunk, service_id))
    return parts
