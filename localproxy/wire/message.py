"""The tunnel ``Message`` value type, ``MessageType`` and the size limits (re-exported by codec)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Union

BytesLike = Union[bytes, bytearray, memoryview]

MAX_PAYLOAD_SIZE = 64512  # 63 KiB: the service's payload limit
MAX_FRAME_SIZE = 65535  # the 2-byte length prefix's limit (message body bytes)
MAX_WS_MESSAGE = 131076  # largest websocket message either way


class MessageType(IntEnum):
    """``Message.type`` values of the schema (an unknown value decodes to a plain int)."""

    UNKNOWN = 0
    DATA = 1
    STREAM_START = 2
    STREAM_RESET = 3
    SESSION_RESET = 4
    SERVICE_IDS = 5
    CONNECTION_START = 6
    CONNECTION_RESET = 7


class Message:
    """One tunnel ``Message``. Equality compares the seven schema fields by value.

    ``type`` is a ``MessageType`` or, for a value the schema does not know, an ``int``.
    ``has_unknown_fields`` (set by the decoder) is not part of equality.
    """

    __slots__ = (
        "type",
        "stream_id",
        "ignorable",
        "payload",
        "service_id",
        "available_service_ids",
        "connection_id",
        "has_unknown_fields",
    )

    type: int
    stream_id: int
    ignorable: bool
    payload: BytesLike
    service_id: str
    available_service_ids: tuple[str, ...]
    connection_id: int
    has_unknown_fields: bool

    def __init__(
        self,
        type: int = MessageType.UNKNOWN,  # noqa: A002 - the schema's field name
        stream_id: int = 0,
        ignorable: bool = False,
        payload: BytesLike = b"",
        service_id: str = "",
        available_service_ids: Iterable[str] = (),
        connection_id: int = 0,
        has_unknown_fields: bool = False,
    ) -> None:
        self.type = type
        self.stream_id = stream_id
        self.ignorable = ignorable
        self.payload = payload
        self.service_id = service_id
        if available_service_ids.__class__ is not tuple:
            available_service_ids = tuple(available_service_ids)
        self.available_service_ids = available_service_ids
        self.connection_id = connection_id
        self.has_unknown_fields = has_unknown_fields

    def _key(self) -> tuple[object, ...]:
        return (
            int(self.type),
            self.stream_id,
            bool(self.ignorable),
            bytes(self.payload),
            self.service_id,
            tuple(self.available_service_ids),
            self.connection_id,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        payload = bytes(self.payload)
        shown = repr(payload[:32]) + ("..." if len(payload) > 32 else "")
        type_name = self.type.name if isinstance(self.type, MessageType) else str(self.type)
        parts = [f"type={type_name}", f"stream_id={self.stream_id}"]
        if self.ignorable:
            parts.append("ignorable=True")
        if payload:
            parts.append(f"payload=<{len(payload)} bytes {shown}>")
        if self.service_id:
            parts.append(f"service_id={self.service_id!r}")
        if self.available_service_ids:
            parts.append(f"available_service_ids={self.available_service_ids!r}")
        if self.connection_id:
            parts.append(f"connection_id={self.connection_id}")
        if self.has_unknown_fields:
            parts.append("has_unknown_fields=True")
        return f"Message({', '.join(parts)})"
