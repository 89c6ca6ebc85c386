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

With ``masked=True`` (a server reading a client, as the emulator does) the plain
frame is a *masked* one instead, and its payload comes back unmasked: a new
``bytes`` (the one copy unmasking needs); an unmasked frame goes to websockets,
which refuses it. The frames of a fragmented *binary* message (the C++ reference
sends 4 KiB fragments) come back too, as websockets ``Frame`` objects (unmasked,
with their FIN bit) for websockets' own message assembler; its parser then never
sees that message, so the splitter checks what it would: the message's total
size and that no other data frame starts inside it (``failure``).
"""

from __future__ import annotations

import struct
from typing import Any

from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["Message", "WebsocketSplitter", "binary_frame_header", "message_size_limit"]

Message = tuple[bytes, int, int]  # (buffer, start, stop) of one binary message's payload

_PLAIN_BINARY = 0x82  # FIN, no RSV bits, opcode 2
_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)
# What _route decides for a frame that is not a plain message.
_RAW = 1  # whole, to websockets
_FRAGMENT = 2  # a masked binary fragment, as a Frame
_STOP = 3  # too large or a protocol error: everything to websockets from here
_CLOSE_PROTOCOL_ERROR = 1002
_CLOSE_MESSAGE_TOO_BIG = 1009
_NO_LIMIT = 1 << 63
_pack_head16 = struct.Struct("!BBH").pack
_pack_head64 = struct.Struct("!BBQ").pack


def binary_frame_header(size: int, mask_bit: int) -> bytes:
    """The header of a final binary frame of ``size`` bytes; ``mask_bit`` 0x80 (a client's,
    the 4-byte mask follows it) or 0 (a server's)."""
    if size < 126:
        return bytes((_PLAIN_BINARY, mask_bit | size))
    if size < 65536:
        return _pack_head16(_PLAIN_BINARY, mask_bit | 126, size)
    return _pack_head64(_PLAIN_BINARY, mask_bit | 127, size)


def message_size_limit(protocol: Any) -> int:
    """The largest message websockets' ``protocol`` accepts (its ``max_size``)."""
    # "max_size" up to websockets 15, "max_message_size" since.
    limit = getattr(protocol, "max_message_size", None) or getattr(protocol, "max_size", None)
    return int(limit) if limit else _NO_LIMIT


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

    __slots__ = (
        "max_size", "masked", "passthrough", "failure", "_fragmented", "_pieces", "_have", "_total", "_head",
        "_mask_bit", "_own_fragments", "_fragments_size", "_fragment_first",
    )

    def __init__(self, max_size: int, *, masked: bool = False) -> None:
        self.max_size = max_size
        self.masked = masked
        self._mask_bit = 0x80 if masked else 0  # the MASK bit a plain frame has
        self.passthrough = False  # everything goes to websockets from now on
        self._fragmented = False  # inside a fragmented message (websockets assembles it)
        self._pieces: list[bytes | memoryview] = []  # an incomplete frame's bytes so far
        self._have = 0  # their count
        self._total = -1  # the incomplete frame's size; -1 while its header is incomplete
        self._head = 0  # its header length
        # Masked mode: a fragmented binary message whose frames come back as Frame objects.
        self._own_fragments = False
        self._fragments_size = 0
        self._fragment_first = -1  # the incomplete frame is such a fragment: its first byte
        # (close code, reason) when the stream broke a rule websockets would have enforced
        # on frames it did not see; everything goes to websockets after it.
        self.failure: tuple[int, str] | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held here."""
        return self._have

    def feed(self, data: bytes) -> list[Message | Frame | bytes]:
        if self.passthrough and not self._have:  # (a close frame may still be incomplete)
            if self.failure is not None:
                return []  # the connection failed: nothing more is processed
            return [data] if data else []
        out: list[Message | Frame | bytes] = []
        size = len(data)
        pos = 0
        if self._have:
            pos = self._complete(data, out)
            if pos < 0 or self.passthrough:
                if self.passthrough and 0 <= pos < size:
                    out.append(data[pos:])
                return out
        max_size = self.max_size
        mask_bit = self._mask_bit
        fragmented = self._fragmented
        while pos < size:
            # The usual frame, inline: binary, final, masked as the side expects, any length.
            first = data[pos]
            second = data[pos + 1] if pos + 1 < size else 0xFF
            if first == _PLAIN_BINARY and second & 0x80 == mask_bit and not fragmented and pos + 1 < size:
                short = second & 0x7F
                if short < 126:
                    head, length = 2, short
                elif short == 126 and size - pos >= 4:
                    head, length = 4, (data[pos + 2] << 8) | data[pos + 3]
                else:
                    parsed = _header(data, pos, size)
                    if parsed is None:
                        break
                    head, length = parsed
                    head -= 4 if mask_bit else 0
                if length <= max_size:
                    stop = pos + head + length + (4 if mask_bit else 0)
                    if stop <= size:
                        if mask_bit:
                            start = pos + head + 4
                            # apply_mask (C or Python) takes any bytes-like; its annotation says bytes.
                            payload = apply_mask(memoryview(data)[start:stop], data[start - 4 : start])  # type: ignore[arg-type]
                            out.append((payload, 0, length))
                        else:
                            out.append((data, pos + head, stop))
                        pos = stop
                        continue
                    self._start(data, pos, size, stop - pos, stop - pos - length)
                    return out
            parsed = _header(data, pos, size)
            if parsed is None:
                break
            head, length = parsed
            kind = self._route(first, data[pos + 1], length)
            if kind == _STOP:
                if self.failure is None:
                    out.append(data[pos:])  # too large: websockets reads the header and refuses it
                return out  # (a failure: nothing after it may be processed)
            fragmented = self._fragmented
            stop = pos + head + length
            if stop > size:
                self._start(data, pos, size, head + length, head if kind == _FRAGMENT else 0,
                            first if kind == _FRAGMENT else -1)
                return out
            out.append(_fragment(first, data, pos + head, stop) if kind == _FRAGMENT else data[pos:stop])
            pos = stop
            if self.passthrough:  # a close frame: websockets handles the rest
                if pos < size:
                    out.append(data[pos:])
                return out
        if pos < size:  # a header cut by the chunk's end
            self._start(data, pos, size, -1, 0)
        return out

    def _route(self, first: int, second: int, length: int) -> int:
        """Note what a frame that is not a plain message changes; how to return it."""
        opcode = first & 0x0F
        final = first & 0x80
        if length > self.max_size:
            self.passthrough = True
            return _STOP
        if self._own_fragments and opcode in (_OP_TEXT, _OP_BINARY, _OP_CONTINUATION):
            if opcode != _OP_CONTINUATION:
                return self._fail(_CLOSE_PROTOCOL_ERROR, "expected a continuation frame")
            if not second & 0x80 or first & 0x70:
                self._own_fragments = False  # unmasked or RSV bits: websockets refuses it
                return _RAW
            self._fragments_size += length
            if self._fragments_size > self.max_size:
                return self._fail(_CLOSE_MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")
            if final:
                self._fragmented = self._own_fragments = False
            return _FRAGMENT
        if opcode == _OP_BINARY and not final and self.masked and second & 0x80 and not first & 0x70 and not self._fragmented:
            self._fragmented = self._own_fragments = True
            self._fragments_size = length
            return _FRAGMENT
        if opcode == _OP_CLOSE:
            self.passthrough = True
        elif opcode == _OP_TEXT or opcode == _OP_BINARY:
            self._fragmented = not final
        elif opcode == _OP_CONTINUATION and final:
            self._fragmented = False
        return _RAW

    def _fail(self, code: int, reason: str) -> int:
        self.failure = (code, reason)
        self.passthrough = True
        self._own_fragments = False
        return _STOP

    def _start(self, data: bytes, pos: int, size: int, total: int, head: int, fragment_first: int = -1) -> None:
        """Keep the frame at ``pos`` that the chunk ends inside of."""
        self._pieces = [memoryview(data)[pos:size]]
        self._have = size - pos
        self._total = total
        self._head = head  # > 0: a plain binary frame or a fragment (its header length)
        self._fragment_first = fragment_first

    def _complete(self, data: bytes, out: list[Message | Frame | bytes]) -> int:
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
            if (first == _PLAIN_BINARY and joined[1] & 0x80 == self._mask_bit and not self._fragmented
                    and length <= self.max_size):
                self._head = head
            else:
                self._head = 0
                kind = self._route(first, joined[1], length)
                if kind == _STOP:
                    if self.failure is not None:
                        self._clear()
                        return -1  # nothing after a failure may be processed
                    out.append(b"".join(self._pieces))
                    self._clear()
                    return 0  # passthrough: the caller sends the whole chunk on
                if kind == _FRAGMENT:
                    self._head = head
                    self._fragment_first = first
            self._total = head + length
        need = self._total - self._have
        if need > size:
            self._pieces.append(data)
            self._have += size
            return -1
        self._pieces.append(memoryview(data)[:need])
        frame = b"".join(self._pieces)
        head = self._head
        fragment_first = self._fragment_first
        self._clear()
        if fragment_first >= 0:
            out.append(_fragment(fragment_first, frame, head, len(frame)))
        elif not head:
            out.append(frame)
        elif self._mask_bit:  # head includes the 4 mask bytes
            payload = apply_mask(memoryview(frame)[head:], frame[head - 4 : head])  # type: ignore[arg-type]
            out.append((payload, 0, len(payload)))
        else:
            out.append((frame, head, len(frame)))
        return need

    def _clear(self) -> None:
        self._pieces = []
        self._have = 0
        self._total = -1
        self._head = 0
        self._fragment_first = -1


def _fragment(first: int, data: bytes, start: int, stop: int) -> Frame:
    """The masked fragment whose payload is ``data[start:stop]``, unmasked, as websockets' Frame."""
    payload = apply_mask(memoryview(data)[start:stop], data[start - 4 : start])  # type: ignore[arg-type]
    opcode = Opcode.BINARY if first & 0x0F == _OP_BINARY else Opcode.CONT
    return Frame(opcode, payload, bool(first & 0x80))
