"""The two ends of :func:`~localproxy.local.stdio.relay_stdio`: stdin as an ``Input``,
stdout as an ``Output``, each over whatever the platform and the event loop can
use for that descriptor (see :mod:`localproxy.local.stdio` for the choices)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import selectors
import socket
import stat
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["CHUNK", "Input", "Output", "grow_pipe", "open_input", "open_output", "open_shared_socket", "watch_fd"]

logger = logging.getLogger("localproxy.stdio")

CHUNK = 256 * 1024
_WINDOWS = sys.platform == "win32"


class Input:
    """Standard input as the relay reads it: ``read()`` gives b"" at its end."""

    async def read(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Output:
    """Standard output as the relay writes it: ``write()`` returns once there is room."""

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


# --- input: an fd the loop watches, or a reading thread -------------------------------


class _PipeInput(Input):
    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport, restore: Callable[[], None]):
        self._reader = reader
        self._transport = transport
        self._restore = restore

    async def read(self) -> bytes:
        return await self._reader.read(CHUNK)

    def close(self) -> None:
        self._transport.close()
        self._restore()


class _ThreadInput(Input):
    """Blocking reads in a daemon thread; one chunk waits for the loop at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._closed = threading.Event()
        threading.Thread(target=self._run, name=f"stdio-read-{fd}", daemon=True).start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data = os.read(self._fd, CHUNK)
            except OSError as exc:  # e.g. a broken pipe on Windows: the end of input
                logger.debug("Reading fd %d failed: %s", self._fd, exc)
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except Exception:  # noqa: BLE001 - the loop is closed or the put was cancelled
                return
            if not data:
                return

    async def read(self) -> bytes:
        return await self._queue.get()

    def close(self) -> None:
        self._closed.set()


async def open_input(loop: asyncio.AbstractEventLoop, fd: int) -> Input:
    if not _WINDOWS:
        opened = await watch_fd(fd, lambda pipe: _read_pipe(loop, pipe), "rb")
        if opened is not None:
            reader, transport, restore = opened
            return _PipeInput(reader, transport, restore)
    _binary(fd)
    return _ThreadInput(loop, fd)


async def _read_pipe(loop: asyncio.AbstractEventLoop, pipe: Any) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    reader = asyncio.StreamReader(limit=CHUNK)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader, transport


# --- output: an fd the loop watches, or a writing thread ------------------------------------


class _FlowControl(asyncio.Protocol):
    def __init__(self) -> None:
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.lost: BaseException | None = None

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or BrokenPipeError("standard output closed")
        self.can_write.set()


class _PipeOutput(Output):
    def __init__(self, transport: asyncio.WriteTransport, protocol: _FlowControl, restore: Callable[[], None]):
        self._transport = transport
        self._protocol = protocol
        self._restore = restore

    async def write(self, data: bytes) -> None:
        if self._protocol.lost is not None:
            raise self._protocol.lost
        self._transport.write(data)
        await self._protocol.can_write.wait()
        if self._protocol.lost is not None:
            raise self._protocol.lost

    async def aclose(self) -> None:
        # Let what is buffered reach the reader (bounded: the transport's high-water mark).
        if self._protocol.lost is None and self._transport.get_write_buffer_size():
            self._transport.set_write_buffer_limits(high=0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._protocol.can_write.wait(), 5.0)
        self._transport.close()
        self._restore()


class _ThreadOutput(Output):
    """Blocking writes in a daemon thread; the relay waits for each chunk to be written."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._jobs: queue.SimpleQueue[tuple[bytes, asyncio.Future[None]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"stdio-write-{fd}", daemon=True).start()

    async def write(self, data: bytes) -> None:
        done: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put((data, done))
        await done

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            data, done = job
            error: BaseException | None = None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                error = exc
            try:
                self._loop.call_soon_threadsafe(_settle, done, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    async def aclose(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


async def open_output(loop: asyncio.AbstractEventLoop, fd: int) -> Output:
    if not _WINDOWS:
        opened = await watch_fd(fd, lambda pipe: loop.connect_write_pipe(_FlowControl, pipe), "wb")
        if opened is not None:
            transport, protocol, restore = opened
            return _PipeOutput(transport, protocol, restore)
    _binary(fd)
    return _ThreadOutput(loop, fd)


# --- one socket as both stdin and stdout (inetd, systemd sockets, socat) ----------------------------


class _StreamInput(Input):
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self) -> bytes:
        return await self._reader.read(CHUNK)

    def close(self) -> None:
        return None  # the output side closes the shared transport


class _StreamOutput(Output):
    def __init__(self, writer: asyncio.StreamWriter, restore: Callable[[], None]) -> None:
        self._writer = writer
        self._restore = restore

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def aclose(self) -> None:
        # EOF to the parent now: shutdown() reaches the socket itself, not just this duplicate.
        with contextlib.suppress(OSError, RuntimeError):
            if not self._writer.is_closing():
                self._writer.write_eof()
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 5.0)
        self._restore()


async def open_shared_socket(stdin_fd: int, stdout_fd: int) -> tuple[Input, Output] | None:
    """One socket transport both ways when stdin and stdout are the same socket.

    Two pipe transports on it would not do: the write side watches its descriptor
    for readability to learn that the reader went away, and incoming data would
    look like that.
    """
    if _WINDOWS:
        return None
    try:
        first, second = os.fstat(stdin_fd), os.fstat(stdout_fd)
    except OSError:
        return None
    if not (stat.S_ISSOCK(first.st_mode) and (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)):
        return None
    was_blocking = os.get_blocking(stdin_fd)

    def restore() -> None:
        with contextlib.suppress(OSError):
            os.set_blocking(stdin_fd, was_blocking)

    sock = socket.socket(fileno=os.dup(stdin_fd))
    try:
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    except (OSError, ValueError) as exc:
        logger.debug("stdin/stdout socket cannot be used by the event loop (%s): using threads", exc)
        sock.close()
        restore()
        return None
    return _StreamInput(reader), _StreamOutput(writer, restore)


# --- helpers ------------------------------------------------------------------------------------


async def watch_fd(
    fd: int, connect: Callable[[Any], Awaitable[tuple[Any, Any]]], mode: str
) -> tuple[Any, Any, Callable[[], None]] | None:
    """Hand a duplicate of ``fd`` to the loop; None if the loop cannot watch it."""
    if not _watchable(fd, selectors.EVENT_READ if "r" in mode else selectors.EVENT_WRITE):
        return None
    was_blocking = os.get_blocking(fd)

    def restore() -> None:
        with contextlib.suppress(OSError):  # fd closed meanwhile: nothing to restore
            os.set_blocking(fd, was_blocking)

    grow_pipe(fd)
    # A duplicate: the transport closes it, not the process's own stdin/stdout.
    pipe = os.fdopen(os.dup(fd), mode, buffering=0)
    try:
        first, second = await connect(pipe)
    except (ValueError, OSError) as exc:  # not a pipe, socket or terminal after all
        logger.debug("fd %d cannot be watched by the event loop (%s): using a thread", fd, exc)
        pipe.close()
        restore()
        return None
    return first, second, restore


def _watchable(fd: int, event: int) -> bool:
    """Whether the platform's poller takes ``fd``: asked up front, because the loop
    registers a pipe only after ``connect_*_pipe`` returned (a refusal then, e.g.
    epoll's EPERM for /dev/null or a regular file, would leave the relay waiting
    forever on the stdlib loop, and aborts uvloop)."""
    try:
        kind = os.fstat(fd).st_mode
    except OSError:
        return False
    if not (stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind) or stat.S_ISCHR(kind)):
        return False
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, event)
    except (OSError, ValueError):
        return False
    return True


PIPE_SIZE = 1024 * 1024


def grow_pipe(fd: int) -> None:
    """Linux: a 1 MiB pipe (64 KiB by default) moves bulk data in fewer, larger reads.

    Best effort: not a pipe, over /proc/sys/fs/pipe-max-size, or not Linux: left as is.
    """
    if sys.platform != "linux":
        return
    import fcntl

    setter = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # the constant is in fcntl from Python 3.10 on
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, setter, PIPE_SIZE)


def _binary(fd: int) -> None:
    """Windows: no newline translation on the descriptor (Python sets it for 0-2 already)."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import msvcrt

        with contextlib.suppress(OSError):
            msvcrt.setmode(fd, os.O_BINARY)
