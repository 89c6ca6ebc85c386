"""Linux fast path of ``connect``'s stdio: pipes <-> the attached socket inside the kernel.

``os.splice`` moves bytes between a pipe and a socket without copying them through
Python: the ``connect`` process then costs next to no CPU per byte, where a user-space
relay (``relay_stdio``) reads, buffers and writes every chunk. ssh hands a ProxyCommand
pipes on Linux, so this is the common case there; anything else (a tty, a file, a socket,
another system) uses ``relay_stdio``.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import stat
import sys
import threading

CHUNK = 1 << 20


def can_splice(stdin_fd: int = 0, stdout_fd: int = 1) -> bool:
    if sys.platform != "linux" or not hasattr(os, "splice"):
        return False
    try:
        return all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (stdin_fd, stdout_fd))
    except OSError:
        return False


async def splice_stdio(sock: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Relay like ``relay_stdio``: stdin's EOF half-closes the socket; returns when the far
    end has closed and its bytes are all written to stdout (or stdout is gone)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)  # ours; stdin/stdout keep their flags (SPLICE_F_NONBLOCK instead)
    down_done: asyncio.Future[None] = loop.create_future()

    def up() -> None:
        try:
            while _splice(stdin_fd, sock.fileno()):
                pass
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the connection is gone: the other direction ends too
            pass

    def down() -> None:
        try:
            while _splice(sock.fileno(), stdout_fd):
                pass
        except OSError:  # stdout closed (EPIPE) or the connection reset
            pass
        finally:
            loop.call_soon_threadsafe(_finish, down_done)

    # Daemon threads: one blocked reading a stdin that never ends must not keep us alive.
    threading.Thread(target=up, name="connect-stdin", daemon=True).start()
    threading.Thread(target=down, name="connect-stdout", daemon=True).start()
    try:
        await down_done
    finally:
        sock.close()


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _splice(source: int, target: int) -> int:
    """Move what is there (0 at EOF), waiting in ``select`` while there is nothing or no room.

    Never a blocking splice: one that waits for a socket holds the pipe's lock meanwhile,
    which stalls the process at the pipe's other end even in a non-blocking read (ssh).
    """
    while True:
        try:
            return os.splice(source, target, CHUNK, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            readable, _, _ = select.select([source], [], [], 0)
            if readable:
                select.select([], [target], [], 1.0)  # data waits: for room
            else:
                select.select([source], [], [], 1.0)  # for data
