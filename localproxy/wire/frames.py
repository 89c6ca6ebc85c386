"""``FrameDecoder``: cuts a byte stream into tunnel frames and decodes them (codec.py).

The loop reads each frame's length prefix and first 9 body bytes with one
``struct.unpack_from`` call and decodes DATA frames of the common layouts inline
(sid: a streamId of 1 or 2 bytes; len: a payload length of 1 to 3 bytes):

    08 01 | 10 sid | 22 len payload | [2a n serviceId] [38 cid]   protobuf's order (peers)
    08 01 | 10 sid | [2a n serviceId] [38 cid] | 22 len payload   encode_data_frame's order

The bytes around the payload repeat for every frame of a connection, so they are
looked up in a small cache (``decode.data_section``). Any other frame, and any
frame the fast path has a doubt about, goes to the general parser
(``decode.parse_body``), which also gives the precise error.

Before all that, each frame is compared with the last DATA frame the fast path
decoded (the "hot" frame, see ``_HotHeader`` / ``_HotFrame``): a frame that repeats
its bytes around the payload is decoded from remembered offsets and values.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from localproxy.errors import ProtocolError
from localproxy.wire.decode import SECTION_CACHE, data_section, parse_body
from localproxy.wire.message import (
    MAX_FRAME_SIZE,
    MAX_PAYLOAD_SIZE,
    BytesLike,
    Message,
    MessageType,
)

_DATA = MessageType.DATA
_section_cache_get = SECTION_CACHE.get  # data_section's cache, looked up inline first
_new_object = object.__new__
# length prefix, body bytes 0-3 as one int (08 01 10 sid), body bytes 4-8 one by one
_unpack_head = struct.Struct(">HI5B").unpack_from
_HEAD_SIZE = 11
_PADDING = bytes(_HEAD_SIZE)  # read as "beyond the frame" by the fast path's checks
_unpack_tag_and_length = struct.Struct(">4B").unpack_from  # payload tag + 3 varint bytes
_NO_FIELDS = ("", 0)  # (serviceId, connectionId) of a DATA frame without them

# The "hot header": consecutive DATA frames of one connection differ only in the
# payload and its length varint, so the decoder remembers the last fast-path DATA
# frame's bytes before that varint (prefix: from the body start up to and including
# the 0x22 tag) and after the payload (suffix: protobuf's order puts serviceId and
# connectionId there), with their decoded values. A frame that starts with the
# prefix, has a 1-3 byte length varint and ends with the suffix exactly is that
# frame with another payload: it is decoded by two C-speed ``startswith`` calls and
# one unpack instead of the layout branches. Anything else takes the usual path.
# Fields: (bytes needed from the frame start by unpack, prefix, offset of the length
# varint from the frame start, suffix, len(suffix), unpack -> (frame length, 3 varint
# bytes), streamId, (serviceId, connectionId)).
_HotHeader = tuple[int, bytes, int, bytes, int, Callable[[bytes, int], tuple[Any, ...]], int, tuple[str, int]]
_NO_HOT_HEADER: _HotHeader = (1 << 62, b"", 0, b"", 0, _unpack_head, 0, _NO_FIELDS)  # matches nothing
# The hot frame: (bytes from the frame start through the length varint, their count,
# offset of the payload end, frame size) of the last hot DATA frame. It starts with
# the hot header's prefix; a frame that starts with it has the same size too, so its
# offsets are known without reading the length (bulk transfers repeat one size).
_HotFrame = tuple[bytes, int, int, int]
_NO_HOT_FRAME: _HotFrame = (b"", 0, 0, 1 << 62)  # a frame size no data reaches: matches nothing
_HOT_MISSES_BEFORE_REPLACING = 3  # up to 4 connections taking turns keep one of them hot
_BULK_PAYLOAD = 1024  # bytes: payloads this large are worth a new hot frame size
_hot_unpackers: dict[int, Callable[[bytes, int], tuple[Any, ...]]] = {}  # by prefix length


def _hot_header(prefix: bytes, suffix: bytes, stream_id: int, fields: tuple[str, int]) -> _HotHeader:
    size = len(prefix)
    unpack = _hot_unpackers.get(size)
    if unpack is None:  # prefixes are short (the fast path takes serviceIds < 128 bytes)
        unpack = _hot_unpackers[size] = struct.Struct(f">H{size}x3B").unpack_from
    return (size + 5, prefix, size + 2, suffix, len(suffix), unpack, stream_id, fields)


class FrameDecoder:
    """Cuts a byte stream into frames and decodes each into a ``Message`` (sans-I/O).

    ``feed`` takes any split of the stream and returns the messages completed by it.
    Whole frames inside one fed ``bytes`` object are decoded in place (payloads are
    memoryview slices of it); only a trailing partial frame is buffered, and a frame
    that spans several ``feed`` calls is copied once when it completes. Input that
    is not ``bytes`` is first copied into ``bytes`` so payload views never see the
    caller's buffer change.

    After a ``ProtocolError`` the stream position is lost: the decoder is unusable and
    every later ``feed`` raises ``ProtocolError`` again. Messages completed earlier in
    the failing call are discarded with it.
    """

    __slots__ = ("max_frame_size", "max_payload_size", "_partial", "_error", "_hot", "_hot_frame", "_hot_misses")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE, max_payload_size: int = MAX_PAYLOAD_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be within 1..{MAX_FRAME_SIZE}")
        if not 0 <= max_payload_size <= MAX_PAYLOAD_SIZE:
            raise ValueError(f"max_payload_size must be within 0..{MAX_PAYLOAD_SIZE}")
        self.max_frame_size = max_frame_size
        self.max_payload_size = max_payload_size
        self._partial = bytearray()  # the bytes of an incomplete frame at the stream's end
        self._error: str | None = None
        self._hot: _HotHeader = _NO_HOT_HEADER
        self._hot_frame: _HotFrame = _NO_HOT_FRAME
        # DATA frames in a row that missed the hot frame. The cache is replaced only
        # after a few, so a few connections taking turns do not rebuild it per frame.
        self._hot_misses = _HOT_MISSES_BEFORE_REPLACING

    @property
    def pending(self) -> int:
        """Number of buffered bytes of an incomplete frame."""
        return len(self._partial)

    def feed(self, data: BytesLike, start: int = 0, stop: int | None = None) -> list[Message]:
        """Add stream bytes, ``data[start:stop]``; return the messages of every frame completed by them.

        A range of a ``bytes`` object is read in place (a websocket message inside a
        received chunk: ``ws_frames.py``); payloads are views of ``data``.
        """
        if self._error is not None:
            raise ProtocolError(f"frame decoder is unusable after an earlier error: {self._error}")
        if data.__class__ is not bytes:
            data = bytes(data[start:stop])
            start, stop = 0, None
        hot_need, hot_prefix, hot_varint_offset, hot_suffix, hot_suffix_size, hot_unpack, hot_stream_id, hot_fields = (
            self._hot
        )
        hot_head, hot_head_size, hot_payload_end, hot_frame_size = self._hot_frame
        size = len(data) if stop is None else stop
        # One whole frame with the hot frame's header, nothing buffered: the usual
        # websocket message of a bulk transfer, decoded without the loop's setup.
        if (
            size - start == hot_frame_size
            and data.startswith(hot_head, start)
            and (not hot_suffix_size or data.startswith(hot_suffix, start + hot_payload_end))
            and not self._partial
        ):
            message = _new_object(Message)
            message.type = _DATA
            message.stream_id = hot_stream_id
            message.ignorable = False
            message.payload = memoryview(data)[start + hot_head_size : start + hot_payload_end]
            message.service_id, message.connection_id = hot_fields
            message.available_service_ids = ()
            message.has_unknown_fields = False
            if self._hot_misses:
                self._hot_misses = 0
            return [message]
        hot_misses = self._hot_misses
        pos = start
        if self._partial:
            frame, pos = self._complete_partial(data, start, size)
            if frame is None:
                return []
            messages = self.feed(frame)  # one whole frame: leaves nothing buffered
        else:
            messages = []
        view = memoryview(data)
        max_frame = self.max_frame_size
        max_payload = self.max_payload_size
        # The loop is inlined here, not a helper, because a call per feed shows in
        # the one-frame-per-websocket-message case.
        try:
            while True:
                # The hot frame's header (and so its size, which passed the limits): offsets
                # known. Not yet complete (or the initial empty header): the general path.
                if data.startswith(hot_head, pos):
                    end = pos + hot_frame_size
                    payload_end = pos + hot_payload_end
                    if end <= size and (not hot_suffix_size or data.startswith(hot_suffix, payload_end)):
                        message = _new_object(Message)
                        message.type = _DATA
                        message.stream_id = hot_stream_id
                        message.ignorable = False
                        message.payload = view[pos + hot_head_size : payload_end]
                        message.service_id, message.connection_id = hot_fields
                        message.available_service_ids = ()
                        message.has_unknown_fields = False
                        messages.append(message)
                        if hot_misses:
                            self._hot_misses = hot_misses = 0
                        if end == size:
                            return messages
                        pos = end
                        continue
                elif pos + hot_need <= size and data.startswith(hot_prefix, pos + 2):
                    length, b5, b6, b7 = hot_unpack(data, pos)
                    start = pos + hot_varint_offset
                    if b5 < 0x80:
                        start += 1
                        payload_end = start + b5
                    elif b6 < 0x80:
                        start += 2
                        payload_end = start + ((b5 & 0x7F) | (b6 << 7))
                    elif b7 < 0x80:
                        start += 3
                        payload_end = start + ((b5 & 0x7F) | (b6 & 0x7F) << 7 | (b7 << 14))
                    else:
                        payload_end = size + 1  # fails the end <= size test below
                    end = pos + 2 + length
                    if (
                        payload_end + hot_suffix_size == end
                        and end <= size
                        and length <= max_frame
                        and payload_end - start <= max_payload
                        and (not hot_suffix_size or data.startswith(hot_suffix, payload_end))
                    ):
                        message = _new_object(Message)
                        message.type = _DATA
                        message.stream_id = hot_stream_id
                        message.ignorable = False
                        message.payload = view[start:payload_end]
                        message.service_id, message.connection_id = hot_fields
                        message.available_service_ids = ()
                        message.has_unknown_fields = False
                        messages.append(message)
                        # Large frames of another size in a row: make it the hot frame
                        # (a bulk transfer repeats one size; interactive ones vary).
                        if payload_end - start >= _BULK_PAYLOAD:
                            if hot_misses >= _HOT_MISSES_BEFORE_REPLACING:
                                self._hot_frame = hot_head, hot_head_size, hot_payload_end, hot_frame_size = (
                                    data[pos:start],
                                    start - pos,
                                    payload_end - pos,
                                    end - pos,
                                )
                                hot_misses = -1
                            self._hot_misses = hot_misses = hot_misses + 1
                        if end == size:
                            return messages
                        pos = end
                        continue
                if size - pos >= _HEAD_SIZE:
                    length, head, tag, b5, b6, b7, b8 = _unpack_head(data, pos)
                elif size - pos >= 2:  # near the end: pad a copy of the last few bytes
                    length, head, tag, b5, b6, b7, b8 = _unpack_head(data[pos:size] + _PADDING, 0)
                else:
                    break
                end = pos + 2 + length
                if length > max_frame:
                    raise _frame_too_large(length, max_frame)
                if end > size:
                    break
                if head & 0xFFFFFF00 == 0x08011000:  # type DATA, then a streamId
                    stream_id = head & 0xFF
                    tag_at = pos + 6  # where the field after streamId starts
                    # A 2-byte stream id (128..16383): shift by one byte. Longer ones leave
                    # a byte >= 0x80 in tag, which no branch below accepts.
                    if stream_id >= 0x80 and tag < 0x80:
                        stream_id = (stream_id & 0x7F) | (tag << 7)
                        tag, b5, b6, b7 = b5, b6, b7, b8
                        tag_at += 1
                    # Each branch sets fields = (serviceId, connectionId), start and
                    # payload_end, or leaves fields None for the general parser.
                    fields = None
                    if tag == 0x22:  # protobuf's order: payload, then maybe fields 5 and 7
                        start = tag_at + 2
                    elif tag == 0x2A or tag == 0x38:  # serviceId and/or connectionId, then the payload
                        # First guess the usual run, [2a n serviceId] 38 cid, and look it up.
                        payload_tag_at = tag_at + 4 + b5 if tag == 0x2A else tag_at + 2
                        section = _section_cache_get(data[tag_at:payload_tag_at])
                        if section is None:  # not the guess, or not seen yet: walk the fields
                            payload_tag_at = tag_at
                            next_tag = tag
                            if next_tag == 0x2A and b5 < 0x80:
                                payload_tag_at += 2 + b5
                                next_tag = data[payload_tag_at] if payload_tag_at < end else 0
                            if next_tag == 0x38 and payload_tag_at + 1 < end and data[payload_tag_at + 1] < 0x80:
                                payload_tag_at += 2
                            if payload_tag_at != tag_at:
                                section = data_section(data[tag_at:payload_tag_at])
                        if section is not None:
                            if payload_tag_at + 4 <= size:
                                payload_tag, b5, b6, b7 = _unpack_tag_and_length(data, payload_tag_at)
                            else:  # at the very end of data: pad a copy
                                payload_tag, b5, b6, b7 = _unpack_tag_and_length(data[payload_tag_at:size] + _PADDING, 0)
                            if payload_tag == 0x22:
                                fields = section
                                start = payload_tag_at + 2
                    if fields is not None or tag == 0x22:
                        # b5, b6, b7: the bytes after the payload tag, its length varint
                        if b5 < 0x80:
                            payload_end = start + b5
                        elif b6 < 0x80:
                            start += 1
                            payload_end = start + ((b5 & 0x7F) | (b6 << 7))
                        elif b7 < 0x80:
                            start += 2
                            payload_end = start + ((b5 & 0x7F) | (b6 & 0x7F) << 7 | (b7 << 14))
                        else:
                            payload_end = end + 1
                        if payload_end == end:
                            if fields is None:
                                fields = _NO_FIELDS
                        elif payload_end < end and tag == 0x22:  # protobuf's order: fields after the payload
                            tail = data[payload_end:end]
                            fields = _section_cache_get(tail) or data_section(tail)
                        else:
                            fields = None
                        # An oversized payload goes to parse_body too, which raises the error.
                        if fields is not None and payload_end - start <= max_payload:
                            # Inline construction: about twice as fast as calling Message(...).
                            message = _new_object(Message)
                            message.type = _DATA
                            message.stream_id = stream_id
                            message.ignorable = False
                            message.payload = view[start:payload_end]
                            message.service_id, message.connection_id = fields
                            message.available_service_ids = ()
                            message.has_unknown_fields = False
                            messages.append(message)  # (3.11 specializes this call)
                            # Enough misses in a row: this connection's next frames will
                            # take the hot path (a few connections taking turns keep the old one).
                            if hot_misses >= _HOT_MISSES_BEFORE_REPLACING:
                                varint_at = start - 1 if b5 < 0x80 else start - 2 if b6 < 0x80 else start - 3
                                self._hot = hot = _hot_header(
                                    data[pos + 2 : varint_at], data[payload_end:end], stream_id, fields
                                )
                                (
                                    hot_need,
                                    hot_prefix,
                                    hot_varint_offset,
                                    hot_suffix,
                                    hot_suffix_size,
                                    hot_unpack,
                                    hot_stream_id,
                                    hot_fields,
                                ) = hot
                                self._hot_frame = hot_head, hot_head_size, hot_payload_end, hot_frame_size = (
                                    data[pos:start],
                                    start - pos,
                                    payload_end - pos,
                                    end - pos,
                                )
                                hot_misses = -1
                            self._hot_misses = hot_misses = hot_misses + 1
                            if end == size:  # the usual end of a websocket message
                                return messages
                            pos = end
                            continue
                messages.append(parse_body(data, view, pos + 2, end, max_payload))
                pos = end
        except ProtocolError as error:
            self._error = str(error)
            self._partial = bytearray()
            raise
        if pos < size:
            self._partial += view[pos:size]
        return messages

    def _complete_partial(self, data: bytes, start: int, size: int) -> tuple[bytes | None, int]:
        """Add to the buffered frame the bytes of ``data[start:size]`` it still needs.

        Returns (the whole frame or None while still incomplete, where data goes on).
        """
        partial = self._partial
        pos = start
        if len(partial) < 2:
            if pos >= size:
                return None, size
            partial.append(data[pos])
            pos += 1
            length = (partial[0] << 8) | partial[1]
            if length > self.max_frame_size:
                error = _frame_too_large(length, self.max_frame_size)
                self._error = str(error)
                self._partial = bytearray()
                raise error
        need = 2 + ((partial[0] << 8) | partial[1]) - len(partial)
        if size - pos < need:
            partial += memoryview(data)[pos:size]
            return None, size
        partial += memoryview(data)[pos : pos + need]
        frame = bytes(partial)
        partial.clear()
        return frame, pos + need


def _frame_too_large(length: int, max_frame: int) -> ProtocolError:
    return ProtocolError(f"frame length {length} exceeds the {max_frame}-byte limit")
