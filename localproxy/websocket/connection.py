"""The tunnel's websocket: websockets for the handshake and control frames, data messages straight to the proxy.

websockets' asyncio connection hands each received message to ``recv()`` through
a queue, a future and a task switch, after copying it three to four times.
:class:`TunnelConnection` cuts the stream with :class:`~localproxy.wire.ws_frames.WebsocketSplitter`
instead and calls its receiver's ``received(buffer, start, stop)`` from
``data_received``: the tunnel runs in the callback that read the socket, and a
message inside one received chunk is never copied. Pings, pongs, the close
handshake, text, fragmented messages and protocol errors still go through
websockets' protocol, which the splitter always feeds at a frame boundary; data
messages websockets assembles (fragments) reach the receiver too, in stream order.
``recv()`` is not used with it (nothing would arrive there).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask
from websockets.protocol import State

from localproxy.websocket.keepalive import KeepaliveConnection
from localproxy.wire.ws_frames import (
    WebsocketSplitter,
    binary_frame_header,
    message_size_limit,
)

__all__ = ["MessageReceiver", "TunnelConnection"]

_OPEN = State.OPEN
_CONNECTING = State.CONNECTING
_DATA_OPCODES = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)
_TEXT = None  # in the early queue: a text message
_MASK_POOL = 4096  # bytes of os.urandom per refill (1024 masks: one getrandom call)


class MessageReceiver(Protocol):
    def received(self, buffer: bytes, start: int, stop: int) -> None:
        """A binary message: ``buffer[start:stop]`` (do not keep ``buffer`` longer than needed)."""

    def received_text(self) -> None:
        """A text message (the tunnel has none)."""

    def connection_lost(self) -> None:
        """The TCP connection is gone (after a close handshake or not)."""


class TunnelConnection(KeepaliveConnection):
    """A keepalive client connection whose data messages go to :meth:`attach`'s receiver."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receiver: MessageReceiver | None = None
        self._splitter: WebsocketSplitter | None = None  # set when the handshake succeeds
        self._handshake_tail = b""  # the last bytes of the HTTP response seen so far
        self._fragments: list[Any] = []
        self._fragmented_text = False
        # Messages that came right behind the handshake, before the session attached
        # (within a loop iteration or two: the opening coroutine resumes right away).
        self._early: list[tuple[bytes, int, int] | None] = []
        self._masks = b""
        self._mask_pos = _MASK_POOL

    def write_message(self, data: bytes) -> None:
        """Write one binary message to the transport at once, framed and masked here.

        For the sender's idle fast path, which checked that websockets' protocol is
        open and nothing waits in the write buffer; websockets keeps no state about
        unfragmented data frames it sends, so writing beside it is safe. Masks come
        from a pool of ``os.urandom`` (as unpredictable as websockets' own, without
        a system call per message).
        """
        pos = self._mask_pos
        if pos >= _MASK_POOL:
            self._masks = os.urandom(_MASK_POOL)
            pos = 0
        self._mask_pos = pos + 4
        mask = self._masks[pos : pos + 4]
        self.transport.write(binary_frame_header(len(data), 0x80) + mask + apply_mask(data, mask))

    def attach(self, receiver: MessageReceiver) -> None:
        """Send messages to ``receiver`` from now on (those that came already first)."""
        self.receiver = receiver
        early, self._early = self._early, []
        for item in early:
            if item is _TEXT:
                receiver.received_text()
            else:
                receiver.received(*item)
        if self.protocol.state is State.CLOSED:
            receiver.connection_lost()

    # --- asyncio.Protocol --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.note_received()
        splitter = self._splitter
        if splitter is None:
            self._handshake_received(data)
            return
        protocol = self.protocol
        for item in splitter.feed(data):
            if item.__class__ is tuple:
                # After a close frame or a protocol error websockets drops data frames.
                if protocol.state is _OPEN:
                    self._deliver(*item)
            else:
                ClientConnection.data_received(self, item)  # type: ignore[arg-type]
                if self.check_unsent():  # pongs written for pings: bounded (keepalive.py)
                    return

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.receiver is not None:
            self.receiver.connection_lost()

    # --- websockets ----------------------------------------------------------------------

    def process_event(self, event: Any) -> None:
        """Data frames websockets parsed itself (fragments, text): assembled, to the receiver."""
        if self.response is None or event.__class__ is not Frame or event.opcode not in _DATA_OPCODES:
            super().process_event(event)  # the handshake response; pongs
            return
        if event.opcode is not Opcode.CONT:
            self._fragments = []
            self._fragmented_text = event.opcode is Opcode.TEXT
        self._fragments.append(event.data)
        if not event.fin:
            return
        fragments, self._fragments = self._fragments, []
        if self._fragmented_text:
            self._deliver_text()
        else:
            message = b"".join(fragments)
            self._deliver(message, 0, len(message))

    # --- internals -----------------------------------------------------------------------

    def _handshake_received(self, data: bytes) -> None:
        """websockets parses the HTTP response; the websocket stream after it is the splitter's."""
        if self.protocol.state is not _CONNECTING:
            ClientConnection.data_received(self, data)
            return
        seen = self._handshake_tail + data
        end = seen.find(b"\r\n\r\n")
        if end < 0:
            self._handshake_tail = seen[-3:]
            ClientConnection.data_received(self, data)
            return
        cut = end + 4 - len(self._handshake_tail)  # a 101 response has no body
        ClientConnection.data_received(self, data[:cut])
        rest = data[cut:]
        if self.protocol.state is _OPEN:
            self._splitter = WebsocketSplitter(message_size_limit(self.protocol))
            if rest:
                self.data_received(rest)
        elif rest:  # a refusal's body, or whatever follows a bad response
            ClientConnection.data_received(self, rest)

    def _deliver(self, buffer: bytes, start: int, stop: int) -> None:
        receiver = self.receiver
        if receiver is None:
            self._early.append((buffer, start, stop))
        else:
            receiver.received(buffer, start, stop)

    def _deliver_text(self) -> None:
        if self.receiver is None:
            self._early.append(_TEXT)
        else:
            self.receiver.received_text()
