"""Relay one connection over standard input/output (``--stdio``, ``localproxy connect``).

:func:`relay_stdio` copies stdin to a stream writer and a stream reader to stdout
until either side ends. How it reads and writes the two descriptors depends on
what they are and what the event loop can watch:

- On POSIX, pipes, sockets and terminals are watched by the loop
  (``connect_read_pipe``/``connect_write_pipe``, with flow control both ways);
  their blocking flag, which the loop clears, is put back at the end (it is
  shared with whoever else holds the same open file, e.g. the shell's terminal).
- Anything the loop cannot watch (a regular file, ``/dev/null`` under epoll, and
  every descriptor on Windows, whose stdlib loop cannot watch anonymous pipes such
  as the ones OpenSSH for Windows gives a ProxyCommand) is read and written by
  a daemon thread each way with blocking calls, one chunk in flight: the same
  backpressure. A thread blocked reading stdin when the relay ends is left to
  the process's exit (a blocking read cannot be interrupted portably).

There is no half-close in the tunnel protocol: stdin's end ends the connection
(``write_eof``), after which what the far end had already sent is still copied out
until the proxy closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["CHUNK", "relay_stdio"]

logger = logging.getLogger("localproxy.stdio")

CHUNK = 256 * 1024
_WINDOWS = sys.platform == "win32"


async def relay_stdio(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, stdin_fd: int = 0, stdout_fd: int = 1
) -> None:
    """Copy ``stdin_fd`` -> ``writer`` and ``reader`` -> ``stdout_fd`` until either side ends.

    Returns when the far end closed (its bytes all written out) or when stdin ended
    and the connection then closed; ``writer`` is closed on return. A stdout that
    nobody reads any more (EPIPE) ends the relay too. Cancellable.
    """
    loop = asyncio.get_running_loop()
    source = await _open_input(loop, stdin_fd)
    sink = await _open_output(loop, stdout_fd)
    upstream = loop.create_task(_copy_in(source, writer), name="stdio-in")
    downstream = loop.create_task(_copy_out(reader, sink), name="stdio-out")
    try:
        done, _ = await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        if downstream not in done:
            # stdin ended: the connection was ended with it; copy out what is left.
            await downstream
    finally:
        for task in (upstream, downstream):
            task.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        writer.close()
        source.close()
        await sink.aclose()


async def _copy_in(source: "_Input", writer: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read():
            writer.write(data)
            await writer.drain()
        logger.debug("Standard input ended: ending the connection")
        if writer.can_write_eof():
            writer.write_eof()
        else:  # pragma: no cover - every transport we make can
            writer.close()
    except (ConnectionError, OSError) as exc:
        logger.debug("Relaying standard input stopped: %s", exc)


async def _copy_out(reader: asyncio.StreamReader, sink: "_Output") -> None:
    try:
        while data := await reader.read(CHUNK):
            await sink.write(data)
        logger.debug("The connection ended")
    except (ConnectionError, OSError) as exc:
        logger.debug("Relaying to standard output stopped: %s", exc)


# --- input: an fd the loop watches, or a reading thread -------------------------------


class _Input:
    async def read(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _PipeInput(_Input):
    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport, restore: Callable[[], None]):
        self._reader = reader
        self._transport = transport
        self._restore = restore

    async def read(self) -> bytes:
        return await self._reader.read(CHUNK)

    def close(self) -> None:
        self._transport.close()
        self._restore()


class _ThreadInput(_Input):
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


async def _open_input(loop: asyncio.AbstractEventLoop, fd: int) -> _Input:
    if not _WINDOWS:
        opened = await _watch(fd, lambda pipe: _read_pipe(loop, pipe), "rb")
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


class _Output:
    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


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


class _PipeOutput(_Output):
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


class _ThreadOutput(_Output):
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


async def _open_output(loop: asyncio.AbstractEventLoop, fd: int) -> _Output:
    if not _WINDOWS:
        opened = await _watch(fd, lambda pipe: loop.connect_write_pipe(_FlowControl, pipe), "wb")
        if opened is not None:
            transport, protocol, restore = opened
            return _PipeOutput(transport, protocol, restore)
    _binary(fd)
    return _ThreadOutput(loop, fd)


# --- helpers ------------------------------------------------------------------------------------


async def _watch(
    fd: int, connect: Callable[[Any], Awaitable[tuple[Any, Any]]], mode: str
) -> tuple[Any, Any, Callable[[], None]] | None:
    """Hand a duplicate of ``fd`` to the loop; None if the loop cannot watch it."""
    was_blocking = os.get_blocking(fd)

    def restore() -> None:
        with contextlib.suppress(OSError):  # fd closed meanwhile: nothing to restore
            os.set_blocking(fd, was_blocking)

    # A duplicate: the transport closes it, not the process's own stdin/stdout.
    pipe = os.fdopen(os.dup(fd), mode, buffering=0)
    try:
        first, second = await connect(pipe)
    except (ValueError, OSError) as exc:  # a regular file; /dev/null under epoll
        logger.debug("fd %d cannot be watched by the event loop (%s): using a thread", fd, exc)
        pipe.close()
        restore()
        return None
    return first, second, restore


def _binary(fd: int) -> None:
    """Windows: no newline translation on the descriptor (Python sets it for 0-2 already)."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import msvcrt

        with contextlib.suppress(OSError):
            msvcrt.setmode(fd, os.O_BINARY)
