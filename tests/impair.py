"""An impairment forwarder for tests and benchmarks: a real network's faults on loopback.

``Forwarder(target_port, delay=0.1)`` listens on 127.0.0.1 and forwards every
accepted TCP connection to ``127.0.0.1:target_port``, per direction:

- ``delay``: each chunk is delivered ``delay`` seconds after it was read
  (pipelined, a delay line: not stop-and-wait). At most ``window`` bytes wait
  in the line; beyond that the forwarder stops reading, as a TCP window would.
- ``bandwidth``: bytes per second (a pacing clock per direction), or None.
- ``idle_kill``: a connection that carried no byte either way for that many
  seconds is aborted (RST both ways), like a load balancer or a NAT.

and on command: :meth:`cut` aborts the open connections (RST both ways);
:meth:`blackhole` stops forwarding on them but keeps their sockets open (a
half-open link: bytes sent into it vanish, nothing comes out). New connections
are forwarded normally after either.

No tool on pip/apt fits: toxiproxy needs its Go server and has no idle kill.
``python tests/impair.py --target PORT [--delay-ms N] [--bandwidth B/s]
[--idle-kill S]`` runs it as a process for the benchmarks: it prints
``{"port": N}`` and reads the commands ``cut`` / ``blackhole`` on stdin (it
ends when stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
from collections import deque
from typing import Any, Callable, Coroutine

WINDOW = 4 * 1024 * 1024  # bytes in the delay line per direction, like a TCP window
CHUNK = 65536


class _Pipe:
    """One direction of one connection: read, hold ``delay`` seconds, pace, write."""

    def __init__(self, link: "_Link", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float) -> None:
        self.link = link
        self.reader, self.writer = reader, writer
        self.delay = delay
        self.line: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        forwarder = self.link.forwarder
        while True:
            await self.has_room.wait()
            data = await self.reader.read(CHUNK)
            if not data:
                break
            self.link.touch()
            if self.link.blackholed:
                continue  # swallowed: nothing comes out of a black hole
            self.line.append((loop.time() + self.delay, data))
            self.queued += len(data)
            self.has_data.set()
            if self.queued >= forwarder.window:
                self.has_room.clear()
        self.line.append((loop.time() + self.delay, b""))  # EOF travels the line too
        self.has_data.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        rate = self.link.forwarder.bandwidth
        clock = loop.time()  # the pacing clock: when the link is free again
        while True:
            while not self.line:
                self.has_data.clear()
                await self.has_data.wait()
            when, data = self.line[0]
            if when > loop.time():
                await asyncio.sleep(when - loop.time())
            if rate:
                clock = max(clock, loop.time()) + len(data) / rate
                if clock > loop.time():
                    await asyncio.sleep(clock - loop.time())
            self.line.popleft()
            self.queued -= len(data)
            if self.queued < self.link.forwarder.window:
                self.has_room.set()
            if self.link.blackholed:
                continue
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.link.touch()
            self.writer.write(data)
            await self.writer.drain()


class _Link:
    def __init__(self, forwarder: "Forwarder", client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.forwarder = forwarder
        self.writers = (client[1], server[1])
        self.blackholed = False
        self.last_active = asyncio.get_running_loop().time()
        up = _Pipe(self, client[0], server[1], forwarder.delay_up)
        down = _Pipe(self, server[0], client[1], forwarder.delay_down)
        self.tasks = [asyncio.create_task(job()) for job in (up.read, up.write, down.read, down.write)]

    def touch(self) -> None:
        self.last_active = asyncio.get_running_loop().time()

    def abort(self) -> None:
        """RST both ways (SO_LINGER 0: a plain close would send a FIN)."""
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None and not writer.transport.is_closing():
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()

    async def run(self) -> None:
        try:
            await asyncio.gather(*self.tasks)
        except (ConnectionError, asyncio.CancelledError):
            self.abort()
        else:  # both ways ended with EOF: flush and close
            for writer in self.writers:
                writer.close()


class Forwarder:
    """See the module docstring. ``async with Forwarder(port, ...) as fwd: fwd.port``."""

    def __init__(self, target_port: int, *, delay: float = 0.0, delay_up: float | None = None,
                 delay_down: float | None = None, bandwidth: float | None = None,
                 idle_kill: float | None = None, window: int = WINDOW) -> None:
        self.target_port = target_port
        self.delay_up = delay if delay_up is None else delay_up
        self.delay_down = delay if delay_down is None else delay_down
        self.bandwidth = bandwidth
        self.idle_kill = idle_kill
        self.window = window
        self.port = 0
        self.links: set[_Link] = set()
        self.accepted = 0
        self.idle_kills = 0
        self.changed = asyncio.Event()  # set at each accept and each idle kill
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "Forwarder":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.idle_kill is not None:
            self._spawn(self._watch_idle(self.idle_kill))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def cut(self) -> int:
        """Abort every open connection (RST both ways); returns how many."""
        links = list(self.links)
        for link in links:
            link.abort()
        return len(links)

    def blackhole(self) -> int:
        """Stop forwarding on every open connection, keep the sockets open; returns how many."""
        for link in self.links:
            link.blackholed = True
        return len(self.links)

    async def wait(self, check: Callable[[], bool], timeout: float) -> None:
        """Until ``check()`` is true (re-checked at each accept / idle kill), at most ``timeout`` s."""

        async def until() -> None:
            while not check():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.target_port), 10)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        link = _Link(self, (reader, writer), server)
        self.links.add(link)
        self.accepted += 1
        self.changed.set()
        try:
            await link.run()
        finally:
            self.links.discard(link)

    async def _watch_idle(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(limit / 4, 0.25))
            now = loop.time()
            for link in list(self.links):
                if now - link.last_active >= limit:
                    link.abort()
                    self.links.discard(link)
                    self.idle_kills += 1
                    self.changed.set()


async def _main(args: argparse.Namespace) -> None:
    forwarder = Forwarder(args.target, delay=args.delay_ms / 1000, bandwidth=args.bandwidth,
                          idle_kill=args.idle_kill, window=args.window)
    loop = asyncio.get_running_loop()
    async with forwarder:
        print(json.dumps({"port": forwarder.port}), flush=True)
        while True:  # bounded by stdin: the parent closes it (or dies)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = line.strip()
            if command == "cut":
                count = forwarder.cut()
            elif command == "blackhole":
                count = forwarder.blackhole()
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
                continue
            print(json.dumps({command: count}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added delay per direction")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes per second per direction")
    parser.add_argument("--idle-kill", type=float, default=None, help="abort connections idle this many seconds")
    parser.add_argument("--window", type=int, default=WINDOW, help="bytes in flight per direction")
    asyncio.run(_main(parser.parse_args()))
