"""Protobuf base-128 varints: encoding with precomputed tables, slow-path decoding."""

from __future__ import annotations

from localproxy.errors import ProtocolError

# Single-byte varints (values 0..127): the common case for tags, ids and flags.
VARINT1: tuple[bytes, ...] = tuple(bytes((value,)) for value in range(0x80))
# A value 128..65535 encodes as VARINT_LOW[value & 0x7F] + VARINT_HIGH[value >> 7]:
# two small tables instead of computing bytes((...)) on every frame.
VARINT_LOW: tuple[bytes, ...] = tuple(bytes((value | 0x80,)) for value in range(0x80))
VARINT_HIGH: tuple[bytes, ...] = tuple(
    bytes((high,)) if high < 0x80 else bytes((high & 0x7F | 0x80, high >> 7)) for high in range(0x200)
)

_MASK64 = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    """Encode an int as protobuf does; negatives (int32/int64) become 10-byte varints."""
    if 0 <= value < 0x80:
        return VARINT1[value]
    value &= _MASK64  # two's complement, sign-extended to 64 bits like protobuf
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_length_varint(length: int) -> bytes:
    """Encode a non-negative length as a varint (table-driven below 65536)."""
    if length < 0x80:
        return VARINT1[length]
    if length < 0x10000:
        return VARINT_LOW[length & 0x7F] + VARINT_HIGH[length >> 7]
    return encode_varint(length)


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read the varint at ``pos`` (the field ends at ``end``); return (value, next pos).

    Values wider than 64 bits keep their low 64 bits; more than 10 bytes is an error,
    as in protobuf.
    """
    result = 0
    shift = 0
    limit = min(end, pos + 10)
    while pos < limit:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7
    if pos >= end:
        raise ProtocolError("truncated message: a varint runs past the end of the frame")
    raise ProtocolError("malformed varint: longer than 10 bytes")
