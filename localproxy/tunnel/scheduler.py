"""Which frames the next websocket message carries: fair, low-latency, order-safe (sans-I/O).

Every connection of every service shares one websocket. A single FIFO makes a
keystroke wait behind megabytes of a bulk transfer; :class:`SendScheduler`
keeps one queue per local connection (a *flow*) and builds each message from
them:

- **Deficit round robin by bytes** between flows, so bulk connections get equal
  shares; plus FQ-CoDel's sparse-flow rule: a flow that had nothing queued goes
  ahead of the backlogged ones for one quantum, so an interactive connection's
  bytes leave in the next message.
- **Order that must hold, holds.** A flow's frames keep their order (its DATA,
  then its CONNECTION_RESET). A stream-level frame (STREAM_START, STREAM_RESET)
  is a *barrier* in its service: what the service queued before it goes first,
  what it queued after waits for it (epochs count the barriers). Frames tied to
  nothing (an answer to a dead stream) go before everything.
- **DATA is cut here**, at the size the message has room for, so a slow link
  gets small messages (see :mod:`localproxy.tunnel.pacing`) without re-framing upstream.
- **Backpressure per flow**: :meth:`push_data` says when to stop reading a
  connection (its own queue is over ``flow_high``, or the whole queue is over
  ``total_high``); :meth:`take_resumed` lists those to read again. A paused bulk
  connection no longer stops an interactive one from being read.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from localproxy.wire.codec import BytesLike

__all__ = ["FLOW_HIGH", "FLOW_LOW", "QUANTUM", "TOTAL_HIGH", "Framer", "SendScheduler"]

QUANTUM = 16 * 1024  # bytes a backlogged flow sends per round (at most the message budget)
FLOW_HIGH = 256 * 1024  # stop reading a connection with this much queued...
FLOW_LOW = 64 * 1024  # ...until it is back under this
TOTAL_HIGH = 1024 * 1024  # over this in all, stop reading every connection that has bytes queued
MIN_CHUNK = 256  # the smallest DATA frame cut to fit a tiny budget
# No new DATA frame in a message that has less room left than this (unless the rest of
# the connection's data fits): small tail frames only cost every hop per-frame work.
MIN_TAIL = 8 * 1024


class Framer(Protocol):
    """Builds DATA frames of one connection (``localproxy.tunnel.actions.DataFramer``)."""

    @property
    def max_payload(self) -> int: ...
    @property
    def overhead(self) -> int: ...
    def frames(self, data: BytesLike) -> list[BytesLike]: ...


class _Flow:
    """One connection's queue: items ``(epoch, size, bytes, framer or None for a control frame)``."""

    __slots__ = ("key", "service", "items", "size", "deficit", "listed", "paused")

    def __init__(self, key: int, service: "_Service") -> None:
        self.key = key
        self.service = service
        self.items: deque[tuple[int, int, BytesLike, Framer | None]] = deque()
        self.size = 0
        self.deficit = 0
        self.listed: deque[_Flow] | None = None  # the round-robin list it is on, if any
        self.paused = False  # push_data asked to stop reading it


class _Service:
    """Barrier bookkeeping of one service: epoch = barriers queued so far."""

    __slots__ = ("epoch", "barriers", "pending", "blocked")

    def __init__(self) -> None:
        self.epoch = 0
        self.barriers: deque[tuple[int, bytes]] = deque()  # (epoch, frame), in order
        self.pending: dict[int, int] = {}  # epoch -> flow items of that epoch not yet sent
        self.blocked: list[_Flow] = []  # flows whose head waits for the first barrier


class SendScheduler:
    """Per-connection queues -> websocket messages. See the module docstring."""

    def __init__(
        self,
        *,
        quantum: int = QUANTUM,
        flow_high: int = FLOW_HIGH,
        flow_low: int = FLOW_LOW,
        total_high: int = TOTAL_HIGH,
    ) -> None:
        self.quantum = quantum
        self.flow_high = flow_high
        self.flow_low = flow_low
        self.total_high = total_high
        self.queued = 0  # bytes in all queues (frames and payloads)
        # Bytes of control frames queued: unlike payloads (read from local sockets, paused
        # past flow_high), a peer can make them (a reset per frame it sends), so the
        # engine bounds them (Engine.MAX_UNSENT_CONTROL).
        self.control_queued = 0
        self._round = quantum  # the quantum of the current message size (<= quantum)
        self._flows: dict[int, _Flow] = {}
        self._services: dict[str, _Service] = {}
        self._urgent: deque[bytes] = deque()
        self._ready: deque[tuple[_Service, bytes]] = deque()  # barriers whose turn came
        self._new: deque[_Flow] = deque()
        self._old: deque[_Flow] = deque()
        self._paused: set[_Flow] = set()
        self._resumed: list[int] = []

    def __bool__(self) -> bool:
        return self.queued > 0

    @property
    def flows(self) -> int:
        """Connections with something queued or paused (for tests and stats)."""
        return len(self._flows)

    def queued_for(self, key: int) -> int:
        flow = self._flows.get(key)
        return 0 if flow is None else flow.size

    # --- input ------------------------------------------------------------------

    def push_control(self, frame: bytes, key: int = 0, service_id: str | None = None) -> None:
        """Queue a control frame: a connection's (``key``), a stream barrier (``service_id``
        only), or one ordered with nothing (neither)."""
        self.queued += len(frame)
        self.control_queued += len(frame)
        if key:
            assert service_id is not None, "a connection's frame needs its service"
            self._push(key, service_id, frame, len(frame), None)
        elif service_id is not None:
            service = self._service(service_id)
            epoch = service.epoch
            service.epoch += 1
            service.barriers.append((epoch, frame))
            if len(service.barriers) == 1 and not service.pending.get(epoch):
                self._ready.append((service, frame))
        else:
            self._urgent.append(frame)

    def push_data(self, key: int, service_id: str, framer: Framer, data: BytesLike) -> bool:
        """Queue a connection's payload; True: stop reading that connection for now."""
        size = data.nbytes if data.__class__ is memoryview else len(data)
        if not size:
            return False
        self.queued += size
        flow = self._push(key, service_id, data, size, framer)
        if not flow.paused and (flow.size > self.flow_high or self.queued > self.total_high):
            flow.paused = True
            self._paused.add(flow)
            return True
        return False

    def take_resumed(self) -> list[int]:
        """Keys of connections to read again (paused by :meth:`push_data`)."""
        resumed, self._resumed = self._resumed, []
        return resumed

    # --- output -----------------------------------------------------------------

    def take_message(self, budget: int) -> list[BytesLike]:
        """The frames (as parts) of the next message: about ``budget`` bytes at most.

        Never empty while anything is queued: the first frame goes even if larger.
        """
        parts: list[BytesLike] = []
        used = 0
        was_over = self.queued > self.total_high
        urgent = self._urgent
        while urgent and (not used or used + len(urgent[0]) <= budget):
            frame = urgent.popleft()
            parts.append(frame)
            used += len(frame)
            self.queued -= len(frame)
            self.control_queued -= len(frame)
        quantum = self._round = max(MIN_CHUNK, min(self.quantum, budget))
        while used < budget:
            if self._ready:
                service, frame = self._ready[0]
                if used and used + len(frame) > budget:
                    break
                self._ready.popleft()
                parts.append(frame)
                used += len(frame)
                self.queued -= len(frame)
                self.control_queued -= len(frame)
                self._barrier_sent(service)
                continue
            flow = self._new[0] if self._new else self._old[0] if self._old else None
            if flow is None:
                break
            if not flow.items:  # drained as a new flow, its old-list turn came: done
                self._unlist(flow)
                self._forget_if_idle(flow)
                continue
            if flow.deficit <= 0:
                flow.deficit += quantum
                self._move(flow, self._old)
                continue
            if self._blocked(flow):
                continue
            used = self._serve(flow, parts, used, budget)
            if flow.items and flow.deficit > 0 and not self._blocked(flow):
                break  # the message is full; this flow continues its turn in the next one
        if was_over and self.queued <= self.total_high and self._paused:
            for flow in [flow for flow in self._paused if flow.size <= self.flow_low]:
                self._resume(flow)
        return parts

    # --- internals ----------------------------------------------------------------

    def _service(self, service_id: str) -> _Service:
        service = self._services.get(service_id)
        if service is None:
            service = self._services[service_id] = _Service()
        return service

    def _push(self, key: int, service_id: str, payload: BytesLike, size: int, framer: Framer | None) -> _Flow:
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(key, self._service(service_id))
        service = flow.service
        epoch = service.epoch
        flow.items.append((epoch, size, payload, framer))
        flow.size += size
        service.pending[epoch] = service.pending.get(epoch, 0) + 1
        if flow.listed is None and flow not in service.blocked:
            flow.deficit = self._round
            flow.listed = self._new
            self._new.append(flow)
        return flow

    def _blocked(self, flow: _Flow) -> bool:
        """Park ``flow`` if its next item waits for a barrier of its service."""
        barriers = flow.service.barriers
        if not (flow.items and barriers and flow.items[0][0] > barriers[0][0]):
            return False
        self._unlist(flow)
        flow.service.blocked.append(flow)
        return True

    def _serve(self, flow: _Flow, parts: list[BytesLike], used: int, budget: int) -> int:
        """Send from ``flow`` while it has deficit, items and room; returns the message's
        size so far (frame headers included; :attr:`queued` counts payloads only)."""
        items = flow.items
        service = flow.service
        barriers = service.barriers
        while items and flow.deficit > 0:
            epoch, size, payload, framer = items[0]
            if barriers and epoch > barriers[0][0]:
                break
            if framer is None:  # a control frame: whole
                if used and used + size > budget:
                    break
                items.popleft()
                parts.append(payload)
                sent = size
                self.control_queued -= size
            else:
                room = budget - used - framer.overhead
                if used and room < min(size, MIN_TAIL):
                    break
                # Not cut to the deficit: a turn may overdraw it by one frame, and the debt
                # delays the flow's next turn (fair in bytes, without tiny frames).
                chunk = min(size, max(room, MIN_CHUNK), framer.max_payload)
                if chunk == size:
                    items.popleft()
                    parts += framer.frames(payload)
                else:
                    view = payload if payload.__class__ is memoryview else memoryview(payload)
                    parts += framer.frames(view[:chunk])
                    items[0] = (epoch, size - chunk, view[chunk:], framer)
                sent = chunk
                used += framer.overhead
            used += sent
            self.queued -= sent
            flow.size -= sent
            flow.deficit -= sent
            if sent == size:
                self._item_sent(service, epoch)
        if not items:
            self._flow_emptied(flow)
        if flow.paused and (not flow.size or flow.size <= self.flow_low and self.queued <= self.total_high):
            self._resume(flow)
        return used

    def _item_sent(self, service: _Service, epoch: int) -> None:
        left = service.pending[epoch] - 1
        if left:
            service.pending[epoch] = left
            return
        del service.pending[epoch]
        barriers = service.barriers
        if barriers and barriers[0][0] == epoch:
            self._ready.append((service, barriers[0][1]))

    def _barrier_sent(self, service: _Service) -> None:
        service.barriers.popleft()
        if service.barriers:
            epoch, frame = service.barriers[0]
            if not service.pending.get(epoch):
                self._ready.append((service, frame))
        blocked, service.blocked = service.blocked, []
        for flow in blocked:
            flow.deficit = max(flow.deficit, self._round)
            flow.listed = self._new
            self._new.append(flow)

    def _flow_emptied(self, flow: _Flow) -> None:
        if flow.listed is self._new:
            self._move(flow, self._old)  # FQ-CoDel: a drained new flow goes behind the old ones
        else:
            self._unlist(flow)
            self._forget_if_idle(flow)

    def _forget_if_idle(self, flow: _Flow) -> None:
        if not flow.items and not flow.paused and flow.listed is None:
            self._flows.pop(flow.key, None)

    def _move(self, flow: _Flow, target: deque[_Flow]) -> None:
        self._unlist(flow)
        flow.listed = target
        target.append(flow)

    def _unlist(self, flow: _Flow) -> None:
        listed = flow.listed
        if listed is not None:
            if listed[0] is flow:
                listed.popleft()
            else:
                listed.remove(flow)
            flow.listed = None

    def _resume(self, flow: _Flow) -> None:
        flow.paused = False
        self._paused.discard(flow)
        self._resumed.append(flow.key)
        self._forget_if_idle(flow)
