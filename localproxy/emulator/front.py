"""One port, two protocols: websocket upgrades and the HTTP control API.

websockets' server refuses requests with a body, so each accepted connection is a
``FrontConnection`` (a websockets ``ServerConnection``, plugged in with ``serve``'s
documented ``create_connection`` hook) that reads the request head itself first:

- ``GET``: the head (under 4 KiB, else 431) and everything after go to websockets,
  which runs the opening handshake with the emulator's hooks (``server.py``).
- anything else: the connection stays here as a small HTTP/1.1 keep-alive server
  for the control API (``POST /``); websockets never sees a byte of it, and its
  handshake task just waits for the connection to end.

After a ``GET`` head, the relay's hot path skips websockets' frame parser and
writer (which copy each payload three to five times): a masked binary message, or
a fragment of one, is cut from the received bytes and unmasked by
:class:`~localproxy.wire.ws_frames.WebsocketSplitter` and handed to websockets' message
queue as the frame websockets would have made (so ``recv()``, its read-ahead limit
and pause work as before); every other frame (ping, close, text, anything
malformed) still goes to websockets' parser, at a frame boundary.
:meth:`FrontConnection.send_binary` frames a message itself and writes header and
payload without joining them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from itertools import count
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from localproxy.emulator.handshake import MAX_REQUEST_HEAD, Admission
from localproxy.wire.codec import BytesLike
from localproxy.wire.ws_frames import (
    WebsocketSplitter,
    binary_frame_header,
    message_size_limit,
)

logger = logging.getLogger("localproxy.emulator.front")

MAX_HTTP_HEAD = 16384
MAX_HTTP_BODY = 1 << 20
HEAD_TIMEOUT = 10.0  # seconds to send a whole request head
IDLE_TIMEOUT = 60.0  # keep-alive connections of the control API

_channel_counter = count(1)
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,10}")
_BODY_HEADER_RE = re.compile(rb"\r\n(content-length:[ \t]*0*[1-9]|transfer-encoding:)")
_OPEN = State.OPEN
_DELIVERING = (State.CONNECTING, State.OPEN)  # states in which websockets queues data frames


def new_channel_id() -> str:
    """A Netty-style channel id, the shape the real service sends in ``channel-id``."""
    return (
        f"{secrets.token_hex(8)}-{os.getpid() & 0xFFFFFFFF:08x}-{next(_channel_counter):08x}-"
        f"{secrets.token_hex(8)}-{secrets.token_hex(4)}"
    )


HttpHandler = Callable[[str, str, dict[str, str], bytes], tuple[int, list[tuple[str, str]], bytes]]


@dataclass
class FrontConfig:
    http_handler: HttpHandler
    # Seconds after which a websocket that carried no frame (nor ping) either way is
    # aborted, as the service's load balancer does (~60 s); None: never.
    ws_idle_timeout: float | None = None
    # Connections not (yet) handed to websockets: closed by the emulator at shutdown.
    unrouted: set[FrontConnection] = field(default_factory=set)


class FrontConnection(ServerConnection):
    def __init__(self, *args: Any, front: FrontConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.front = front
        self.channel_id = new_channel_id()
        self.admission: Admission | None = None  # set by process_request when the token is good
        self._route: str | None = None  # None: reading the head; "ws" or "http"
        self._buffer = bytearray()
        self._body_size: int | None = None  # HTTP: body bytes awaited for the parsed head
        self._request: tuple[str, str, str, dict[str, str]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._routed: asyncio.Future[None] = self.loop.create_future()
        self._last_active = 0.0  # websocket: loop time of the last byte either way
        self._splitter: WebsocketSplitter | None = None  # set after a GET head
        self._http_paused = False  # HTTP: reading paused until the answers drain

    # --- asyncio protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.front.unrouted.add(self)
        self._timer = self.loop.call_later(HEAD_TIMEOUT, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.front.unrouted.discard(self)
        super().connection_lost(exc)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        """websockets' opening handshake, for ``GET`` connections only.

        Other connections wait here until they end, so websockets neither answers
        them nor logs their end as a failed handshake. A malformed upgrade (refused
        by websockets with its own 4xx) is logged briefly, without a traceback.
        """
        await asyncio.wait([self._routed, self.connection_lost_waiter], return_when=asyncio.FIRST_COMPLETED)
        if self._route != "ws":
            await asyncio.shield(self.connection_lost_waiter)
            return
        try:
            await super().handshake(*args, **kwargs)
        except Exception as error:  # the refusal was sent; the caller closes the connection
            logger.info("websocket upgrade refused (channel %s): %s", self.channel_id, error)

    def data_received(self, data: bytes) -> None:
        if self._route == "ws":
            self._last_active = self.loop.time()
            splitter = self._splitter
            if splitter is None:
                super().data_received(data)
                return
            for item in splitter.feed(data):
                if isinstance(item, tuple):
                    self._deliver(Frame(Opcode.BINARY, item[0]))
                elif isinstance(item, Frame):  # a fragment of a binary message: websockets assembles it
                    self._deliver(item)
                else:
                    super().data_received(item)
            if splitter.failure is not None and self.protocol.state is _OPEN:
                # A rule websockets' parser would have enforced on frames it did not see.
                self.protocol.fail(*splitter.failure)
                self.send_data()
        elif self._route == "http":
            self._restart_timer(IDLE_TIMEOUT)
            self._http_feed(data)
        elif self._route is None:
            self._sniff(data)
        # "closed": a refusal was sent; ignore the rest

    def _sniff(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HTTP_HEAD:
                self._reply_and_close(431, "Request header fields too large")
            return
        if self._buffer.startswith(b"GET "):
            if end + 4 >= MAX_REQUEST_HEAD:  # "under 4 KiB"
                self._reply_and_close(431, f"Request header fields too large: the upgrade request must stay under {MAX_REQUEST_HEAD} bytes")
                return
            if _BODY_HEADER_RE.search(bytes(self._buffer[:end]).lower()):
                self._reply_and_close(400, "A websocket upgrade request has no body")
                return
            self._route = "ws"
            self._routed.set_result(None)
            self.front.unrouted.discard(self)
            self._cancel_timer()
            if self.front.ws_idle_timeout is not None:
                self._last_active = self.loop.time()
                self._timer = self.loop.call_later(self.front.ws_idle_timeout, self._check_idle)
            head = bytes(self._buffer[: end + 4])
            rest = bytes(self._buffer[end + 4 :])  # frames right behind the request, if any
            self._buffer = bytearray()
            super().data_received(head)
            self._splitter = WebsocketSplitter(message_size_limit(self.protocol), masked=True)
            if rest:
                self.data_received(rest)
        else:
            self._route = "http"
            self._routed.set_result(None)
            self._restart_timer(IDLE_TIMEOUT)
            head = bytes(self._buffer)
            self._buffer = bytearray()
            self._http_feed(head)

    def send_data(self) -> None:
        if self._route == "ws":
            self._last_active = self.loop.time()
        super().send_data()

    # --- the relay's hot path -------------------------------------------------

    def _deliver(self, frame: Frame) -> None:
        """A binary message or fragment, to websockets' queue as its own parser would put it."""
        if self.protocol.state in _DELIVERING:  # after a close websockets drops data frames
            self.process_event(frame)

    async def send_binary(self, data: BytesLike) -> None:
        """Send one binary message like ``send``: framed here (a server does not mask),
        header and payload written without joining them; waits while the write buffer
        is above its high-water mark. Raises ``ConnectionClosed`` as ``send`` does."""
        if self.protocol.state is not _OPEN:
            await self.send(data)  # type: ignore[arg-type]  # websockets raises the right ConnectionClosed
            return
        self._last_active = self.loop.time()
        self.transport.writelines((binary_frame_header(len(data), 0), data))
        if self.paused:
            try:
                await self.drain()
            except Exception as exc:  # the connection was lost while waiting
                raise self.protocol.close_exc from exc

    # --- timers -----------------------------------------------------------------

    def _check_idle(self) -> None:
        limit = self.front.ws_idle_timeout
        assert limit is not None
        idle = self.loop.time() - self._last_active
        if idle < limit:
            self._timer = self.loop.call_later(limit - idle, self._check_idle)
            return
        self._timer = None
        logger.info("closing websocket (channel %s): idle for %.1f s (--idle-timeout)", self.channel_id, idle)
        self.transport.abort()

    def _timed_out(self) -> None:
        self._timer = None
        self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _restart_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    # --- HTTP/1.1 for the control API -----------------------------------------

    def _http_feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while not self.transport.is_closing():
            if self._body_size is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HTTP_HEAD:
                        self._reply_and_close(431, "Request header fields too large")
                    return
                head = bytes(buffer[:end]).decode("latin-1")
                del buffer[: end + 4]
                if not self._parse_head(head):
                    return
            assert self._body_size is not None and self._request is not None
            if len(buffer) < self._body_size:
                return
            body = bytes(buffer[: self._body_size])
            del buffer[: self._body_size]
            method, target, version, headers = self._request
            self._body_size, self._request = None, None
            status, reply_headers, payload = self.front.http_handler(method, target, headers, body)
            connection = headers.get("connection", "").lower()
            keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
            self._write(status, reply_headers, b"" if method == "HEAD" else payload, keep_alive)
            if not keep_alive:
                self.transport.close()
            elif self.paused:
                # A client that pipelines requests and never reads the answers: stop
                # reading it until its answers drain (the idle timeout still runs).
                self._http_paused = True
                self.transport.pause_reading()
                return

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._http_paused and not self.transport.is_closing():
            self._http_paused = False
            self.transport.resume_reading()
            self._http_feed(b"")  # requests already received

    def _parse_head(self, head: str) -> bool:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            self._reply_and_close(400, "Malformed HTTP request line")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._reply_and_close(400, "Malformed HTTP header line")
                return False
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._reply_and_close(501, "Transfer-Encoding is not supported: send Content-Length")
            return False
        length = headers.get("content-length", "0")
        # Digits only: int() also takes "0_2", " +2" and thousands of digits.
        if not _CONTENT_LENGTH_RE.fullmatch(length):
            self._reply_and_close(400, "Invalid Content-Length")
            return False
        size = int(length)
        if size > MAX_HTTP_BODY:
            self._reply_and_close(413, f"Request body too large (limit {MAX_HTTP_BODY} bytes)")
            return False
        if headers.get("expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._request = (parts[0], parts[1], parts[2], headers)
        self._body_size = size
        return True

    def _write(self, status: int, headers: list[tuple[str, str]], payload: bytes, keep_alive: bool) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if not any(name.lower() == "content-length" for name, _ in headers):
            lines.append(f"Content-Length: {len(payload)}")
        if not keep_alive:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)

    def _reply_and_close(self, status: int, text: str) -> None:
        logger.info("refused a request: %d %s", status, text)
        body = text.encode()
        headers = [
            ("Date", formatdate(usegmt=True)),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("channel-id", self.channel_id),
        ]
        self._route = "closed"
        self._write(status, headers, body, keep_alive=False)
        self.transport.close()
