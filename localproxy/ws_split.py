"""Cuts the service's websocket byte stream into messages without copying them (sans-I/O).

websockets' parser copies every received payload three to four times (into its
stream buffer, out of it, the buffer's shift, the message) and hands each message
to the reader through a future and a task switch. For the tunnel's hot path,
:class:`WebsocketSplitter` reads the frame headers itself, from the first byte
after the handshake, and returns each *plain* frame (binary, final, unmasked,
no reserved bits, within ``max_size``, not inside a fragmented message) as
``(buffer, start, stop)``: a range of the received chunk, or of one joined copy
when the frame spans chunks. Every other frame (ping, pong, close, text,
fragments, anything malformed) is returned whole as ``bytes``, for websockets'
own parser, which is so always fed at a frame boundary and keeps doing what it
does: answer pings, run the close handshake, reject protocol errors. After a
close frame, or a frame over ``max_size`` (websockets rejects it after reading
its header), everything goes to websockets unsplit.
"""

from __future__ import annotations

__all__ = ["Message", "WebsocketSplitter"]

Message = tuple[bytes, int, int]  # (buffer, start, stop) of one binary message's payload

_PLAIN_BINARY = 0x82  # FIN, no RSV bits, opcode 2
_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)


def _header(data: bytes, pos: int, size: int) -> tuple[int, int] | None:
    """(header length, payload length) of the frame at ``pos``, or None if incomplete."""
    if size - pos < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    head = 2
    if length == 126:
        if size - pos < 4:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        head = 4
    elif length == 127:
        if size - pos < 10:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        head = 10
    if second & 0x80:  # masked (a server must not: websockets says so)
        head += 4
    return head, length


class WebsocketSplitter:
    """Feed it the bytes received after the handshake; it returns messages and raw frames.

    :meth:`feed` returns, in stream order, ``Message`` tuples for plain binary
    frames and ``bytes`` for everything websockets must see. Payload ranges point
    into ``bytes`` objects that are never changed afterwards.
    """

    __slots__ = ("max_size", "passthrough", "_fragmented", "_pieces", "_have", "_total", "_head")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.passthrough = False  # everything goes to websockets from now on
        self._fragmented = False  # inside a fragmented message (websockets assembles it)
        self._pieces: list[bytes | memoryview] = []  # an incomplete frame's bytes so far
        self._have = 0  # their count
        self._total = -1  # the incomplete frame's size; -1 while its header is incomplete
        self._head = 0  # its header length

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held here."""
        return self._have

    def feed(self, data: bytes) -> list[Message | bytes]:
        if self.passthrough and not self._have:  # (a close frame may still be incomplete)
            return [data] if data else []
        out: list[Message | bytes] = []
        size = len(data)
        pos = 0
        if self._have:
            pos = self._complete(data, out)
            if pos < 0 or self.passthrough:
                if self.passthrough and 0 <= pos < size:
                    out.append(data[pos:])
                return out
        max_size = self.max_size
        fragmented = self._fragmented
        while pos < size:
            # The usual frame, inline: binary, final, unmasked, 16- or 64-bit length.
            first = data[pos]
            second = data[pos + 1] if pos + 1 < size else 0xFF
            if first == _PLAIN_BINARY and second < 0x80 and not fragmented:
                if second < 126:
                    head, length = 2, second
                elif second == 126 and size - pos >= 4:
                    head, length = 4, (data[pos + 2] << 8) | data[pos + 3]
                else:
                    parsed = _header(data, pos, size)
                    if parsed is None:
                        break
                    head, length = parsed
                if length <= max_size:
                    stop = pos + head + length
                    if stop <= size:
                        out.append((data, pos + head, stop))
                        pos = stop
                        continue
                    self._start(data, pos, size, head + length, head)
                    return out
            parsed = _header(data, pos, size)
            if parsed is None:
                break
            head, length = parsed
            if not self._route(first, length):
                out.append(data[pos:])  # too large: websockets reads the header and refuses it
                return out
            fragmented = self._fragmented
            stop = pos + head + length
            if stop > size:
                self._start(data, pos, size, head + length, 0)
                return out
            out.append(data[pos:stop])
            pos = stop
            if self.passthrough:  # a close frame: websockets handles the rest
                if pos < size:
                    out.append(data[pos:])
                return out
        if pos < size:  # a header cut by the chunk's end
            self._start(data, pos, size, -1, 0)
        return out

    def _route(self, first: int, length: int) -> bool:
        """Note what a frame websockets must see changes; False if it is over the limit."""
        opcode = first & 0x0F
        final = first & 0x80
        if length > self.max_size:
            self.passthrough = True
            return False
        if opcode == _OP_CLOSE:
            self.passthrough = True
        elif opcode == _OP_TEXT or opcode == _OP_BINARY:
            self._fragmented = not final
        elif opcode == _OP_CONTINUATION and final:
            self._fragmented = False
        return True

    def _start(self, data: bytes, pos: int, size: int, total: int, plain_head: int) -> None:
        """Keep the frame at ``pos`` that the chunk ends inside of."""
        self._pieces = [memoryview(data)[pos:size]]
        self._have = size - pos
        self._total = total
        self._head = plain_head  # > 0: a plain binary frame (its header length)

    def _complete(self, data: bytes, out: list[Message | bytes]) -> int:
        """Add to the incomplete frame; returns where ``data`` goes on, or -1 if it is used up."""
        size = len(data)
        if self._total < 0:  # the header was cut: read it from the pieces and this chunk
            joined = b"".join(self._pieces) + data[:_MAX_HEADER]
            parsed = _header(joined, 0, len(joined))
            if parsed is None:
                self._pieces.append(data)
                self._have += size
                return -1
            head, length = parsed
            first = joined[0]
            if first == _PLAIN_BINARY and joined[1] < 0x80 and not self._fragmented and length <= self.max_size:
                self._head = head
            else:
                self._head = 0
                if not self._route(first, length):
                    out.append(b"".join(self._pieces))
                    self._clear()
                    return 0  # passthrough: the caller sends the whole chunk on
            self._total = head + length
        need = self._total - self._have
        if need > size:
            self._pieces.append(data)
            self._have += size
            return -1
        self._pieces.append(memoryview(data)[:need])
        frame = b"".join(self._pieces)
        head = self._head
        self._clear()
        out.append((frame, head, len(frame)) if head else frame)
        return need

    def _clear(self) -> None:
        self._pieces = []
        self._have = 0
        self._total = -1
        self._head = 0
