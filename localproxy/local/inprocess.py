"""In-process local connections (``LocalProxy.open_connection`` / ``connect_socket``).

An in-process connection is one end of a socket pair served exactly as an accepted
TCP client of a source listener is (a :class:`~localproxy.local.adapters.LocalConnection`
on a transport): the same scheduler, fairness, backpressure (the pair's kernel
buffers, then the transport's high-water mark) and close semantics, and no side
channel to keep in step with it. The caller gets the other end.

``socket.socketpair`` is AF_UNIX where the platform has it, a loopback TCP pair
on Windows: both work with every event loop.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

__all__ = ["serve_socket", "socket_pair"]


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """``(ours, theirs)``: ``ours`` for :func:`serve_socket`, ``theirs`` for the caller."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def serve_socket(sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
    """Serve ``sock`` on the running loop with the protocol ``factory`` makes; closes it on failure."""
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(factory, sock)
    except BaseException:
        sock.close()
        raise
