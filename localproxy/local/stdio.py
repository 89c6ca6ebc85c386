"""Relay one connection over standard input/output (``--stdio``, ``localproxy connect``).

(``--stdio`` first tries :mod:`localproxy.local.stdio_direct`, where stdin/stdout
are the connection's own transport; this relay is its fallback, and the tool for
a connection that is not in this process's proxy.)

:func:`relay_stdio` copies stdin to a stream writer and a stream reader to stdout
until either side ends. How it reads and writes the two descriptors depends on
what they are and what the event loop can watch:

- On POSIX, pipes, sockets and terminals are watched by the loop
  (``connect_read_pipe``/``connect_write_pipe``, with flow control both ways);
  their blocking flag, which the loop clears, is put back at the end (it is
  shared with whoever else holds the same open file, e.g. the shell's terminal).
  One socket as both stdin and stdout (inetd, systemd) is one socket transport.
- Anything the poller refuses (a regular file, ``/dev/null`` under epoll: asked
  up front with a throwaway selector), and every descriptor on Windows (whose
  stdlib loop cannot watch anonymous pipes such as the ones OpenSSH for Windows
  gives a ProxyCommand), is read and written by a daemon thread each way with
  blocking calls, one chunk in flight: the same backpressure. A thread blocked
  reading stdin when the relay ends is left to the process's exit (a blocking
  read cannot be interrupted portably).

The ends themselves are in :mod:`localproxy.local.stdio_ends`.

There is no half-close in the tunnel protocol: stdin's end ends the connection
(``write_eof``), after which what the far end had already sent is still copied out
until the proxy closes the stream.
"""

from __future__ import annotations

import asyncio
import logging

from localproxy.local.stdio_ends import (
    CHUNK,
    Input,
    Output,
    open_input,
    open_output,
    open_shared_socket,
)

__all__ = ["CHUNK", "relay_stdio"]

logger = logging.getLogger("localproxy.stdio")


async def relay_stdio(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, stdin_fd: int = 0, stdout_fd: int = 1
) -> None:
    """Copy ``stdin_fd`` -> ``writer`` and ``reader`` -> ``stdout_fd`` until either side ends.

    Returns when the far end closed (its bytes all written out) or when stdin ended
    and the connection then closed; ``writer`` is closed on return. A stdout that
    nobody reads any more (EPIPE) ends the relay too. Cancellable.
    """
    loop = asyncio.get_running_loop()
    shared = await open_shared_socket(stdin_fd, stdout_fd)
    if shared is not None:
        source, sink = shared
    else:
        source = await open_input(loop, stdin_fd)
        sink = await open_output(loop, stdout_fd)
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


async def _copy_in(source: Input, writer: asyncio.StreamWriter) -> None:
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


async def _copy_out(reader: asyncio.StreamReader, sink: Output) -> None:
    try:
        while data := await reader.read(CHUNK):
            await sink.write(data)
        logger.debug("The connection ended")
    except (ConnectionError, OSError) as exc:
        logger.debug("Relaying to standard output stopped: %s", exc)
