"""The general protobuf parser of one ``Message`` body (FrameDecoder's slow path).

``parse_body(buf, view, start, end, max_payload)`` reads ``buf[start:end]``; ``buf``
is the ``bytes`` holding the frame and ``view`` a memoryview of the same object, so
the payload is returned as a zero-copy slice. The DATA fast path lives in
``frames.py``; every layout it does not recognise comes here.
"""

from __future__ import annotations

from localproxy.errors import ProtocolError
from localproxy.wire.message import Message, MessageType
from localproxy.wire.varint import read_varint

_TYPES: tuple[MessageType, ...] = tuple(MessageType)  # index = enum value
_FIELD_NAMES = ("", "type", "streamId", "ignorable", "payload", "serviceId", "availableServiceIds", "connectionId")
_WIRE_NAMES = ("varint", "64-bit", "length-delimited", "start-group", "end-group", "32-bit", "wire type 6", "wire type 7")


def _int32(value: int) -> int:
    """protobuf's int32 from a (up to 64-bit) varint: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - 0x100000000 if value >= 0x80000000 else value


def _truncated(what: str) -> ProtocolError:
    return ProtocolError(f"truncated message: {what} runs past the end of the frame")


def payload_too_large(size: int, max_payload: int) -> ProtocolError:
    return ProtocolError(f"payload of {size} bytes exceeds the {max_payload}-byte limit")


def parse_body(buf: bytes, view: memoryview, pos: int, end: int, max_payload: int) -> Message:
    """Decode the Message in ``buf[pos:end]`` field by field; ProtocolError if it is not one."""
    type_value = 0
    stream_id = 0
    ignorable = False
    payload: bytes | memoryview = b""
    service_id = ""
    available_service_ids: list[str] = []
    connection_id = 0
    has_unknown_fields = False
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = read_varint(buf, pos - 1, end)
        if tag == 0x08:  # 1 type (enum, int32 on the wire)
            value = buf[pos] if pos < end else 0x80
            if value < 0x80:
                pos += 1
            else:
                value, pos = read_varint(buf, pos, end)
            type_value = _int32(value)
        elif tag == 0x10:  # 2 streamId (int32)
            value = buf[pos] if pos < end else 0x80
            if value < 0x80:
                pos += 1
            else:
                value, pos = read_varint(buf, pos, end)
            stream_id = _int32(value)
        elif tag == 0x18:  # 3 ignorable (bool)
            value, pos = read_varint(buf, pos, end)
            ignorable = value != 0
        elif tag == 0x38:  # 7 connectionId (uint32)
            value, pos = read_varint(buf, pos, end)
            connection_id = value & 0xFFFFFFFF
        elif tag == 0x22 or tag == 0x2A or tag == 0x32:  # 4 payload, 5 serviceId, 6 availableServiceIds
            size, pos = read_varint(buf, pos, end)
            field_end = pos + size
            if field_end > end:
                raise _truncated(f"field {_FIELD_NAMES[tag >> 3]} ({size} bytes)")
            if tag == 0x22:
                if size > max_payload:
                    raise payload_too_large(size, max_payload)
                payload = view[pos:field_end]
            else:
                try:
                    text = buf[pos:field_end].decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ProtocolError(
                        f"field {_FIELD_NAMES[tag >> 3]} is not valid UTF-8 ({error.reason} at byte {error.start})"
                    ) from None
                if tag == 0x2A:
                    service_id = text
                else:
                    available_service_ids.append(text)
            pos = field_end
        else:
            field, wire_type = tag >> 3, tag & 7
            if 1 <= field <= 7:
                raise ProtocolError(
                    f"field {_FIELD_NAMES[field]} ({field}) has the wrong wire type {_WIRE_NAMES[wire_type]}"
                )
            pos = _skip_field(buf, pos, end, tag)
            has_unknown_fields = True
    if type_value == 0:
        raise ProtocolError("message has no type (type 0 / UNKNOWN is not a valid message)")
    return Message(
        _TYPES[type_value] if 0 < type_value < 8 else type_value,
        stream_id,
        ignorable,
        payload,
        service_id,
        tuple(available_service_ids),
        connection_id,
        has_unknown_fields,
    )


def _skip_field(buf: bytes, pos: int, end: int, tag: int) -> int:
    """Skip the value of an unknown field (groups included); return the next position."""
    groups: list[int] = []  # field numbers of the groups being skipped, innermost last
    while True:
        field, wire_type = tag >> 3, tag & 7
        if field == 0 or tag > 0xFFFFFFFF:
            raise ProtocolError(f"invalid field tag {tag}")
        if wire_type == 0:
            _, pos = read_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            size, pos = read_varint(buf, pos, end)
            pos += size
        elif wire_type == 5:
            pos += 4
        elif wire_type == 3:
            groups.append(field)
        elif wire_type == 4:
            if not groups or groups.pop() != field:
                raise ProtocolError(f"unexpected end-group tag for field {field}")
        else:
            raise ProtocolError(f"invalid wire type {wire_type} in field {field}")
        if pos > end:
            raise _truncated(f"unknown field {field}")
        if not groups:
            return pos
        if pos >= end:
            raise _truncated(f"group of field {groups[-1]}")
        tag, pos = read_varint(buf, pos, end)


# Runs of serviceId/connectionId fields around DATA payloads repeat for every frame
# of a connection: the fast path looks them up here instead of re-parsing them.
SECTION_CACHE: dict[bytes, tuple[str, int]] = {}
_SECTION_CACHE_LIMIT = 1024
_SECTION_CACHE_KEY_LIMIT = 160  # bytes: service ids are short; bounds the cache's memory


def data_section(raw: bytes) -> tuple[str, int] | None:
    """(serviceId, connectionId) of ``raw``, a run of fields 5 and 7 (last wins).

    ``None`` when ``raw`` holds anything else or is invalid: the caller then uses
    ``parse_body``, which gives the precise error.
    """
    found = SECTION_CACHE.get(raw)
    if found is None:
        found = _parse_section(raw)
        if found is not None and len(raw) <= _SECTION_CACHE_KEY_LIMIT:
            if len(SECTION_CACHE) >= _SECTION_CACHE_LIMIT:
                SECTION_CACHE.clear()
            SECTION_CACHE[raw] = found
    return found


def _parse_section(raw: bytes) -> tuple[str, int] | None:
    service_id = ""
    connection_id = 0
    pos = 0
    end = len(raw)
    try:
        while pos < end:
            tag = raw[pos]
            if tag == 0x2A:
                size, pos = read_varint(raw, pos + 1, end)
                if pos + size > end:
                    return None
                service_id = raw[pos : pos + size].decode("utf-8")
                pos += size
            elif tag == 0x38:
                value, pos = read_varint(raw, pos + 1, end)
                connection_id = value & 0xFFFFFFFF
            else:
                return None
    except (ProtocolError, UnicodeDecodeError):
        return None
    return service_id, connection_id
