"""One side's byte stream -> whole frames to forward, after the wire rules (sans-I/O).

Tunnel frames do not align with websocket messages (PROTOCOL.md 3), but what the
emulator forwards does: each chunk ``FrameGate.feed`` returns holds whole frames
only (at most ``MAX_WS_MESSAGE`` bytes), so a peer that vanishes mid-frame never
leaves half a frame in the other side's decoder. The common case is zero-copy:
a message made of whole frames is forwarded as is (or as a memoryview slice).

Rules enforced (a breach ends the stream; the frames before it still go through):
the frame must decode (``codec.FrameDecoder``: type non-zero, payload <= 63 KiB,
valid protobuf), no fields beyond the schema, ``streamId != 0`` on stream-bound
types, no SESSION_RESET / SERVICE_IDS from a client, no STREAM_START from a
destination. Unknown types are forwarded: the receiving proxy applies the
``ignorable`` rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localproxy.emulator.store import Side
from localproxy.errors import ProtocolError
from localproxy.wire.codec import MAX_WS_MESSAGE, FrameDecoder, Message, MessageType

DATA = MessageType.DATA
STREAM_BOUND = frozenset(
    {
        MessageType.DATA,
        MessageType.STREAM_START,
        MessageType.STREAM_RESET,
        MessageType.CONNECTION_START,
        MessageType.CONNECTION_RESET,
    }
)
SERVICE_ONLY = frozenset({MessageType.SESSION_RESET, MessageType.SERVICE_IDS})

Chunk = bytes | memoryview


@dataclass
class GateResult:
    chunks: list[Chunk] = field(default_factory=list)  # whole frames, ready to forward
    controls: list[Message] = field(default_factory=list)  # the non-DATA messages among them
    violation: str | None = None  # set: the sender broke a rule; close it with this reason


def violation_of(message: Message, side: Side) -> str | None:
    kind = message.type
    name = kind.name if isinstance(kind, MessageType) else f"type {kind}"
    if message.has_unknown_fields:
        return f"{name} message has fields beyond the schema"
    if kind in STREAM_BOUND and message.stream_id == 0:
        return f"{name} with streamId 0"
    if kind in SERVICE_ONLY:
        return f"{side} sent {name}, which only the service sends"
    if kind is MessageType.STREAM_START and side == "destination":
        return "destination sent STREAM_START: only a source starts streams"
    return None


class FrameGate:
    def __init__(self, side: Side) -> None:
        self.side = side
        self._decoder = FrameDecoder()
        self._carry = bytearray()  # the start of an incomplete frame (also buffered by the decoder)
        self.broken = False

    @property
    def pending(self) -> int:
        return len(self._carry)

    def feed(self, data: bytes) -> GateResult:
        if self.broken:
            return GateResult(violation="stream already broken")
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as error:
            return self._fail(data, str(error))
        result = GateResult()
        side = self.side
        for index, message in enumerate(messages):
            if message.type is DATA and message.stream_id and not message.has_unknown_fields:
                continue
            reason = violation_of(message, side)
            if reason is not None:
                return self._fail(data, reason, index)
            if message.type is not DATA:
                result.controls.append(message)
        if not messages:
            self._carry += data
            return result
        end = len(data) - self._decoder.pending
        carry = self._carry
        if not carry:
            result.chunks.append(data if end == len(data) else memoryview(data)[:end])
        else:
            prefix = bytes(carry[:2]) if len(carry) >= 2 else bytes(carry) + data[:1]
            need = 2 + int.from_bytes(prefix, "big") - len(carry)
            if len(carry) + end <= MAX_WS_MESSAGE:
                result.chunks.append(bytes(carry) + data[:end])
            else:
                result.chunks += [bytes(carry) + data[:need], memoryview(data)[need:end]]
        self._carry = bytearray(data[end:])
        return result

    def _fail(self, data: bytes, reason: str, bad_index: int | None = None) -> GateResult:
        """Slow path: forward the frames before the bad one, report the breach."""
        self.broken = True
        stream = bytes(self._carry) + data
        self._carry = bytearray()
        result = GateResult(violation=reason)
        good: list[bytes] = []
        pos = 0
        while len(stream) - pos >= 2:
            end = pos + 2 + int.from_bytes(stream[pos : pos + 2], "big")
            if end > len(stream) or len(good) == bad_index:
                break
            frame = stream[pos:end]
            try:
                (message,) = FrameDecoder().feed(frame)
            except ProtocolError as error:
                result.violation = str(error)
                break
            own = violation_of(message, self.side)
            if own is not None:
                result.violation = own
                break
            good.append(frame)
            if message.type is not DATA:
                result.controls.append(message)
            pos = end
        chunk = bytearray()
        for frame in good:
            if len(chunk) + len(frame) > MAX_WS_MESSAGE:
                result.chunks.append(bytes(chunk))
                chunk = bytearray()
            chunk += frame
        if chunk:
            result.chunks.append(bytes(chunk))
        return result
