"""stdin/stdout as the transport of one local connection: ``--stdio`` without a relay.

Where the loop can watch both descriptors (POSIX pipes, sockets, terminals; not
one socket for both), :func:`serve_stdio` joins stdin's read-pipe transport and
stdout's write-pipe transport into one duplex :class:`StdioTransport` and hands
it to the protocol (a :class:`~localproxy.local.adapters.LocalConnection`), as a
listener hands it an accepted socket: no socket pair and no copy in between, so
the same fairness, backpressure (stdin is not read while the tunnel is
congested; the proxy stops reading the tunnel while stdout is full) and close
semantics, at the CPU cost of a TCP client. Elsewhere it returns None and the
caller relays (:func:`~localproxy.local.stdio.relay_stdio`).
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from typing import Any, Callable

from localproxy.local.stdio_ends import watch_fd

__all__ = ["StdioTransport", "serve_stdio"]


class StdioTransport(asyncio.Transport):
    """Reads from stdin's transport, writes to stdout's; ``closed`` is done once both ended."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._protocol = protocol
        self._stdin: asyncio.ReadTransport | None = None
        self._stdout: asyncio.WriteTransport | None = None
        self._closing = False
        self._lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _start(self, stdin: asyncio.ReadTransport, stdout: asyncio.WriteTransport, side: "_StdinSide") -> None:
        self._stdin, self._stdout = stdin, stdout
        self._protocol.connection_made(self)
        side.started()  # what stdin gave before (uvloop reads before connection_made)
        if not self._closing:
            stdin.resume_reading()  # paused until the protocol knew its transport

    # --- asyncio.Transport, as LocalConnection uses it ------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert self._stdout is not None
        self._stdout.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._stdout.get_write_buffer_size() if self._stdout is not None else 0

    def write(self, data: Any) -> None:
        if not self._closing and self._stdout is not None:
            self._stdout.write(data)

    def pause_reading(self) -> None:
        if self._stdin is not None and not self._closing:
            self._stdin.pause_reading()

    def resume_reading(self) -> None:
        if self._stdin is not None and not self._closing:
            self._stdin.resume_reading()

    def close(self) -> None:
        """Stop reading; write what is queued to stdout, then report the connection lost."""
        if self._closing:
            return
        self._closing = True
        if self._stdin is not None:
            self._stdin.close()
        if self._stdout is not None:
            self._stdout.close()

    def abort(self) -> None:
        self._closing = True
        if self._stdin is not None:
            self._stdin.close()
        if self._stdout is not None:
            self._stdout.abort()

    # --- from the two sides -----------------------------------------------------------------

    def _stdin_ended(self, exc: Exception | None) -> None:
        if exc is not None:  # a read error: nothing more will come
            self.abort()

    def _stdout_lost(self, exc: Exception | None) -> None:
        """stdout flushed and closed, or its reader went away: the connection is over."""
        self._closing = True
        if self._stdin is not None:
            self._stdin.close()
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)
            if not self.closed.done():
                self.closed.set_result(None)


class _StdinSide(asyncio.Protocol):
    def __init__(self, owner: StdioTransport) -> None:
        self.owner = owner
        # Until the owner started: what arrived, and how stdin ended (if it did).
        self._early: list[bytes] | None = []
        self._early_end: tuple[str, Exception | None] | None = None

    def started(self) -> None:
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)
        if self._early_end is not None:
            kind, exc = self._early_end
            self.eof_received() if kind == "eof" else self.connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]  # a read transport

    def data_received(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
        else:
            self.owner._protocol.data_received(data)

    def eof_received(self) -> bool | None:
        if self._early is not None:
            self._early_end = ("eof", None)
            return None
        keep_open = self.owner._protocol.eof_received()
        if not keep_open:  # as a socket transport does: close after the writes drained
            self.owner.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._early is not None:
            if self._early_end is None:
                self._early_end = ("lost", exc)
            return
        self.owner._stdin_ended(exc)


class _StdoutSide(asyncio.Protocol):
    def __init__(self, owner: StdioTransport) -> None:
        self.owner = owner

    def pause_writing(self) -> None:
        self.owner._protocol.pause_writing()

    def resume_writing(self) -> None:
        self.owner._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._stdout_lost(exc)


async def serve_stdio(
    factory: Callable[[], asyncio.Protocol], *, stdin_fd: int = 0, stdout_fd: int = 1
) -> tuple[StdioTransport, Callable[[], None]] | None:
    """Serve stdin/stdout as one connection of ``factory()``'s protocol, or None if the loop cannot.

    Returns the transport (``await transport.closed`` for the end) and a function
    that puts back the descriptors' blocking flags (call it after the end).
    """
    if sys.platform == "win32" or _same_socket(stdin_fd, stdout_fd):
        return None  # Windows: the Proactor cannot watch anonymous pipes (threads relay them)
    loop = asyncio.get_running_loop()
    protocol = factory()
    owner = StdioTransport(protocol)
    output = await watch_fd(stdout_fd, lambda pipe: loop.connect_write_pipe(lambda: _StdoutSide(owner), pipe), "wb")
    if output is None:
        return None
    stdout, _, restore_stdout = output
    side = _StdinSide(owner)
    source = await watch_fd(stdin_fd, lambda pipe: loop.connect_read_pipe(lambda: side, pipe), "rb")
    if source is None:
        stdout.close()
        restore_stdout()
        return None
    stdin, _, restore_stdin = source

    def restore() -> None:
        restore_stdin()
        restore_stdout()

    owner._start(stdin, stdout, side)
    return owner, restore


def _same_socket(first: int, second: int) -> bool:
    try:
        a, b = os.fstat(first), os.fstat(second)
    except OSError:
        return False
    return stat.S_ISSOCK(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
