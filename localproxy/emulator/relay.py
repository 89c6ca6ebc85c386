"""The data plane after the handshake: one peer per side of a tunnel, bytes between them.

- A peer's messages go through its ``FrameGate`` (wire rules) and are forwarded
  as whole frames to the other side. Backpressure: the sender's next message is
  not read until ``send`` to the other side returns, and ``send`` waits while that
  side's write buffer is above its high-water mark; websockets stops reading the
  sender's socket when its own small receive queue is full.
- Queue per direction, at most: the sending side's kernel receive buffer
  (``RECEIVE_BUFFER``: 512 KiB as SO_RCVBUF, which the kernel doubles, so up to
  ~1 MiB unread) + websockets' read-ahead (``READ_AHEAD`` = 4 messages, 512 KiB) +
  the message being paced or sent + the target's write buffer (``write_limit``,
  256 KiB, server.py) + the kernel's unsent bytes to the target (``UNSENT_BUFFER``,
  128 KiB with ``TCP_NOTSENT_LOWAT``, plus the rest of one segment buffer): about
  2 MiB, ~2.5 ms at loopback speed. The kernel would otherwise
  autotune both socket buffers to megabytes each (measured: a full path held 8.7 MB
  instead of 2.2 MB, tests/test_bounded_path.py; echo p99 beside a bulk transfer
  20-40 ms instead of 7-9); ``bounded_buffers = False``
  (``--autotuned-buffers``) restores that, for 5-10% more bulk throughput on loopback.
  With a bandwidth cap, in front of the pacing: two messages read ahead and, when
  the emulator was capped from its start (its connections then use 1400-byte
  segments), a kernel receive buffer of 10 ms of the cap (at least 8 KiB): what
  waits for the cap waits in the sending proxy, which can reorder it. (A cap set
  later keeps the larger buffer: a small window with loopback's 64 KiB segments
  stalls TCP for seconds.)
- Absent peer: like the real service, data for a side that is not connected is
  dropped (counted in a ``dropped`` event), never buffered.
- A new valid peer in the same side replaces the old one (closed with 1000,
  "replaced by a new connection"); when a side goes away (replaced, dropped,
  revoked) the other side gets STREAM_RESET for each active stream, so its proxy
  closes the local connections of streams whose far end is gone.
- V2/V3 peers get SERVICE_IDS with the tunnel's services on connect; V1 none.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Coroutine

from websockets.exceptions import ConnectionClosed

from localproxy.emulator.events import EventLog
from localproxy.emulator.faults import Faults, TokenBucket, capped_rcvbuf
from localproxy.emulator.front import FrontConnection
from localproxy.emulator.gate import FrameGate
from localproxy.emulator.handshake import Admission
from localproxy.emulator.store import Side, Store
from localproxy.sockopts import NOTSENT_LOWAT
from localproxy.wire.codec import Message, MessageType, encode_frame

logger = logging.getLogger("localproxy.emulator.relay")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008

# Per direction, uncapped (see the module docstring): the kernel receive buffer of the
# sending side's socket (SO_RCVBUF; the kernel doubles it for its bookkeeping), the
# messages websockets reads ahead of the relay, the kernel's unsent bytes to the
# receiving side (TCP_NOTSENT_LOWAT).
RECEIVE_BUFFER = 512 * 1024
READ_AHEAD = 4
UNSENT_BUFFER = 128 * 1024


def other(side: Side) -> Side:
    return "destination" if side == "source" else "source"


def _close_reason(text: str) -> str:
    raw = text.encode()[:123]  # a close reason is at most 123 bytes
    return raw.decode(errors="ignore")


@dataclass(eq=False)
class Peer:
    ws: FrontConnection
    admission: Admission
    channel_id: str
    gate: FrameGate
    bucket: TokenBucket
    current: bool = False  # registered as its side's peer; False once replaced or kicked
    forwarded_bytes: int = 0
    dropped_bytes: int = 0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def tunnel_id(self) -> str:
        return self.admission.tunnel_id

    @property
    def side(self) -> Side:
        return self.admission.side


class Relay:
    def __init__(self, store: Store, events: EventLog, faults: Faults) -> None:
        self.store = store
        self.events = events
        self.faults = faults
        self._peers: dict[tuple[str, Side], Peer] = {}
        self._live: dict[tuple[str, Side], set[Peer]] = defaultdict(set)
        self._streams: dict[str, dict[str, int]] = {}  # tunnel -> service id -> active stream id
        self._handshakes: dict[tuple[str, Side], int] = defaultdict(int)
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by the emulator when its connections have real-network segment sizes: only
        # then may a capped peer's kernel receive buffer be made small (see Emulator.start).
        self.shrink_receive_buffers = False
        # False: the kernel autotunes each peer's socket buffers (megabytes per direction).
        self.bounded_buffers = True

    # --- queries --------------------------------------------------------------

    def peer(self, tunnel_id: str, side: Side) -> Peer | None:
        return self._peers.get((tunnel_id, side))

    def sessions(self, tunnel_id: str, side: Side) -> int:
        """Websockets of that side still open (a replaced one counts until it is gone)."""
        return len(self._live.get((tunnel_id, side), ()))

    def handshake_count(self, tunnel_id: str, side: Side) -> int:
        return self._handshakes.get((tunnel_id, side), 0)

    def count_handshake(self, admission: Admission) -> None:
        self._handshakes[(admission.tunnel_id, admission.side)] += 1

    # --- a peer's life --------------------------------------------------------

    async def run(self, ws: FrontConnection, admission: Admission, channel_id: str) -> None:
        """Serve one admitted websocket until it closes (the websockets handler)."""
        key = (admission.tunnel_id, admission.side)
        peer = Peer(ws, admission, channel_id, FrameGate(admission.side), TokenBucket(self.faults))
        self._live[key].add(peer)
        try:
            tunnel = self.store.tunnel_of(admission.token)
            if admission.version >= 2 and tunnel is not None:
                await ws.send(encode_frame(Message(MessageType.SERVICE_IDS, available_service_ids=tunnel.service_ids)))
            if tunnel is None or tunnel.status != "OPEN" or admission.token.revoked:
                # Closed or rotated while the handshake finished: this peer is already stale.
                await ws.close(CLOSE_NORMAL, "tunnel closed" if tunnel is None or tunnel.status != "OPEN" else "access token revoked")
                return
            # From here to the registration nothing awaits: a kick sees either peer, never neither.
            streams: dict[str, int] = {}
            old = self._peers.get(key)
            if old is not None:
                logger.info("tunnel %s: new %s connection replaces channel %s", peer.tunnel_id, peer.side, old.channel_id)
                self.events.emit("replaced", peer.tunnel_id, peer.side, old_channel=old.channel_id)
                streams = self._unregister(old, "replaced by a new connection", replaced=True)
            self._peers[key] = peer
            peer.current = True
            self._bound_queue(peer)
            self.store.set_connected(peer.tunnel_id, peer.side, True)
            logger.info(
                "tunnel %s: %s connected (%s, channel %s)", peer.tunnel_id, peer.side, admission.subprotocol, channel_id
            )
            self.events.emit("connected", peer.tunnel_id, peer.side, channel_id=channel_id, subprotocol=admission.subprotocol)
            # The other side hears of the old streams' end before any new STREAM_START.
            await self._send_resets(peer.tunnel_id, other(peer.side), streams)
            await self._pump(peer)
        except ConnectionClosed:
            pass
        finally:
            self._live[key].discard(peer)
            if not self._live[key]:
                del self._live[key]
            if peer.current:
                streams = self._unregister(peer, "disconnected")
                await self._send_resets(peer.tunnel_id, other(peer.side), streams)
            peer.stopped.set()
            self.events.changed()

    async def _pump(self, peer: Peer) -> None:
        ws = peer.ws
        target_key = (peer.tunnel_id, other(peer.side))
        gate = peer.gate
        while True:
            message = await ws.recv()
            if message.__class__ is not bytes:
                await self._violation(peer, "text frames are not allowed: tunnel data is binary", CLOSE_UNSUPPORTED_DATA)
                return
            if not peer.current:
                continue  # replaced or revoked while closing: its data goes nowhere
            result = gate.feed(message)
            if result.chunks:
                target = self._peers.get(target_key)
                if result.controls and target is not None:
                    self._track(peer, result.controls)
                for chunk in result.chunks:
                    size = len(chunk)
                    if target is None:
                        peer.dropped_bytes += size
                        continue
                    await peer.bucket.take(size)
                    try:
                        await target.ws.send_binary(chunk)
                        peer.forwarded_bytes += size
                    except ConnectionClosed:
                        peer.dropped_bytes += size
                if target is None:
                    self.events.emit("dropped", peer.tunnel_id, peer.side, size=sum(map(len, result.chunks)))
            if result.violation is not None:
                await self._violation(peer, f"protocol violation: {result.violation}", CLOSE_POLICY_VIOLATION)
                return

    async def _violation(self, peer: Peer, reason: str, code: int) -> None:
        logger.warning("tunnel %s: closing %s (channel %s): %s", peer.tunnel_id, peer.side, peer.channel_id, reason)
        self.events.emit("violation", peer.tunnel_id, peer.side, reason=reason, code=code)
        await peer.ws.close(code, _close_reason(reason))

    def _track(self, peer: Peer, controls: list[Message]) -> None:
        """Follow the active stream of each service, to reset it if a side goes away."""
        streams = self._streams.setdefault(peer.tunnel_id, {})
        for message in controls:
            if message.type is MessageType.STREAM_START:
                streams[message.service_id] = message.stream_id
            elif message.type is MessageType.STREAM_RESET:
                for service_id, stream_id in list(streams.items()):
                    if stream_id == message.stream_id and message.service_id in ("", service_id):
                        del streams[service_id]

    def _unregister(self, peer: Peer, why: str, *, replaced: bool = False) -> dict[str, int]:
        """``peer`` stops being its side's peer; return the streams to reset on the other side."""
        if not peer.current:
            return {}
        peer.current = False
        key = (peer.tunnel_id, peer.side)
        if self._peers.get(key) is peer:
            del self._peers[key]
        if replaced:
            self._spawn(peer.ws.close(CLOSE_NORMAL, why))
        else:
            self.store.set_connected(peer.tunnel_id, peer.side, False)
            logger.info("tunnel %s: %s %s (channel %s)", peer.tunnel_id, peer.side, why, peer.channel_id)
            self.events.emit("disconnected", peer.tunnel_id, peer.side, channel_id=peer.channel_id, reason=why)
        return self._streams.pop(peer.tunnel_id, {})

    async def _send_resets(self, tunnel_id: str, side: Side, streams: dict[str, int]) -> None:
        target = self._peers.get((tunnel_id, side))
        if not streams or target is None:
            return
        with_ids = target.admission.version >= 2
        frames = b"".join(
            encode_frame(Message(MessageType.STREAM_RESET, stream_id=stream_id, service_id=service_id if with_ids else ""))
            for service_id, stream_id in streams.items()
        )
        try:
            await target.ws.send(frames)
        except ConnectionClosed:
            pass

    # --- kicks from the control plane (sync callers) --------------------------

    def kick(self, tunnel_id: str, side: Side, reason: str, *, reset_other: bool = True) -> None:
        """Close that side's websocket now (rotation, CloseTunnel, expiry)."""
        peer = self._peers.get((tunnel_id, side))
        if peer is None:
            return
        streams = self._unregister(peer, reason)
        self._spawn(self._close(peer, reason, streams if reset_other else {}))

    async def _close(self, peer: Peer, reason: str, streams: dict[str, int]) -> None:
        await self._send_resets(peer.tunnel_id, other(peer.side), streams)
        await peer.ws.close(CLOSE_NORMAL, _close_reason(reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def bandwidth_changed(self) -> None:
        for peer in self._peers.values():
            self._bound_queue(peer)

    def _bound_queue(self, peer: Peer) -> None:
        """Keep what waits on each side of the relay small (see the module docstring)."""
        rate = self.faults.bytes_per_second
        if rate is not None:
            read_ahead = (1, 0)  # in front of the pacing: two messages, not sixteen
            rcvbuf = capped_rcvbuf(rate) if self.shrink_receive_buffers else None
        elif self.bounded_buffers:
            read_ahead = (READ_AHEAD - 1, 1)
            rcvbuf = RECEIVE_BUFFER
        else:
            return  # the kernel's autotuning stays on (it cannot be turned back on once off)
        assembler = getattr(peer.ws, "recv_messages", None)
        if assembler is not None and getattr(assembler, "high", None) is not None:
            assembler.high, assembler.low = read_ahead
        sock = peer.ws.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if self.bounded_buffers and NOTSENT_LOWAT is not None:
                sock.setsockopt(socket.IPPROTO_TCP, NOTSENT_LOWAT, UNSENT_BUFFER)
        except OSError:  # pragma: no cover - closed meanwhile
            pass

    async def wait_idle(self) -> None:
        """Let spawned closes finish (used at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    # --- fault injection ------------------------------------------------------

    def _require(self, tunnel_id: str, side: Side) -> Peer:
        peer = self._peers.get((tunnel_id, side))
        if peer is None:
            raise LookupError(f"no {side} is connected to tunnel {tunnel_id}")
        return peer

    async def drop(self, tunnel_id: str, side: Side, *, abort: bool = False) -> None:
        """Close that side's websocket (or abort its TCP connection); return once it is gone."""
        peer = self._require(tunnel_id, side)
        logger.info("tunnel %s: dropping %s (fault injection)", tunnel_id, side)
        streams = self._unregister(peer, "dropped by fault injection")
        if abort:
            peer.ws.transport.abort()
        else:
            await peer.ws.close(CLOSE_GOING_AWAY, "dropped by the emulator (fault injection)")
        await self._send_resets(tunnel_id, other(side), streams)
        await asyncio.wait_for(peer.stopped.wait(), 10)

    async def send_raw(self, tunnel_id: str, side: Side, data: bytes) -> None:
        """One binary websocket message of ``data`` to that side, as is."""
        await self._require(tunnel_id, side).ws.send(data)

    async def send_session_reset(self, tunnel_id: str, side: Side) -> None:
        await self.send_raw(tunnel_id, side, encode_frame(Message(MessageType.SESSION_RESET)))

    async def send_stream_reset(self, tunnel_id: str, side: Side, stream_id: int, service_id: str = "") -> None:
        frame = encode_frame(Message(MessageType.STREAM_RESET, stream_id=stream_id, service_id=service_id))
        await self.send_raw(tunnel_id, side, frame)
