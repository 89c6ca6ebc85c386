"""The receive half of a session: each websocket message through the tunnel as it arrives.

:class:`~localproxy.websocket.connection.TunnelConnection` calls :meth:`Receiver.received`
from the socket's ``data_received``; the message is decoded, the sans-I/O tunnel
decides, and the engine carries the actions out (writes to local sockets) in the
same callback: no queue, no task switch (the unloaded echo's latency is mostly
such hops). The receiver *holds* (stops reading the websocket and queues what the
last chunk still contained, so order is kept) while:

- actions need ``await`` (``Listen``: opening a port), until they are done;
- the receive gate says stop (local writers backlogged: ``Engine.writers_drained``),
  until it says read again;
- the session starts, until its first actions (``session_started``) are applied.

``done`` resolves when the session must end: the connection is gone, or the
engine wants to stop or reconnect (``fatal`` / ``restart``); it raises a bug.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from localproxy.errors import ProtocolError
from localproxy.proxy.engine import Engine
from localproxy.websocket.connection import TunnelConnection
from localproxy.wire.frames import FrameDecoder

__all__ = ["Receiver"]

_Item = tuple[bytes, int, int] | None  # a binary message's range; None: a text message


class Receiver:
    """Feeds one session's websocket messages to the engine's tunnel."""

    def __init__(self, ws: TunnelConnection, engine: Engine, decoder: FrameDecoder) -> None:
        self.ws = ws
        self.engine = engine
        self.decoder = decoder
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue: deque[_Item] = deque()
        self._held = True  # until start()
        self._dropping = False  # done: nothing more is taken
        self._task: asyncio.Task[None] | None = None
        self._pause()
        ws.attach(self)

    async def start(self, actions: list[Any]) -> None:
        """Apply the session's first actions, then take messages (those queued first)."""
        await self._catch_up(actions)

    def stop(self) -> None:
        self._held = self._dropping = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._queue.clear()
        if not self.done.done():
            self.done.cancel()

    # --- from TunnelConnection ---------------------------------------------------------

    def received(self, buffer: bytes, start: int, stop: int) -> None:
        self._arrived((buffer, start, stop))

    def received_text(self) -> None:
        self._arrived(None)

    def connection_lost(self) -> None:
        self._finish(None)

    # --- internals -----------------------------------------------------------------------

    def _arrived(self, item: _Item) -> None:
        """One message: queued while held, else run inline (then hold if it must wait)."""
        if self._held:
            if not self._dropping:
                self._queue.append(item)
            return
        try:
            actions = self._process(item)
            if actions is not None or self._must_hold():
                self._hold(actions)
        except Exception as error:  # noqa: BLE001 - a bug: the session task raises it
            self._finish(error)

    def _process(self, item: _Item) -> list[Any] | None:
        """Run the tunnel on a message; returns actions that need ``await``, if any."""
        engine = self.engine
        tunnel = engine.tunnel
        if item is None:
            actions = tunnel.data_error(ProtocolError("The service sent a text websocket frame"))
        else:
            try:
                actions = tunnel.receive(self.decoder.feed(*item))
            except ProtocolError as error:
                actions = tunnel.data_error(error)
        if engine.needs_async(actions):
            return actions
        engine.apply(actions)
        return None

    def _must_hold(self) -> bool:
        engine = self.engine
        return engine.fatal is not None or engine.restart is not None or not engine.writers_drained.is_set()

    def _pause(self) -> None:
        transport = self.ws.transport
        if not transport.is_closing():
            transport.pause_reading()

    def _hold(self, actions: list[Any] | None) -> None:
        self._held = True
        self._pause()
        self._task = asyncio.get_running_loop().create_task(self._catch_up(actions))

    async def _catch_up(self, actions: list[Any] | None) -> None:
        """Held: apply ``actions``, wait for the gate, work through the queue, then read again."""
        engine = self.engine
        queue = self._queue
        try:
            while not self.done.done():
                if actions is not None:
                    await engine.apply_async(actions)
                    actions = None
                if engine.fatal is not None or engine.restart is not None:
                    self._finish(None)
                    return
                if not engine.writers_drained.is_set():
                    await engine.writers_drained.wait()  # a local reader is slow
                    continue
                if not queue:
                    self._held = False
                    self._task = None
                    transport = self.ws.transport
                    if not transport.is_closing():
                        transport.resume_reading()
                    return
                actions = self._process(queue.popleft())
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a bug: the session task raises it
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        """The session ends: messages still arriving are dropped (the close handshake goes on)."""
        self._held = self._dropping = True
        self._queue.clear()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
        transport = self.ws.transport
        if not transport.is_closing():
            transport.resume_reading()  # websockets must read the service's close frame
