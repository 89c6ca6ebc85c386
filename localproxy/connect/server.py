"""The shared source: ``python -m localproxy.connect --serve``, one per user and thing.

Started (detached) by the first ``localproxy connect`` of a thing; listens on a private
Unix socket (``paths.py``) where later ``connect`` processes attach (``attach.py``), so all
of them share ONE source proxy and ONE tunnel as simultaneous connections. Each attached
socket is handed to the proxy itself (no copy here). Exits after ``--idle-exit`` seconds
without a connection, or soon after the last connection of a ``--close-on-exit`` client
ends (closing the tunnel). Logs go to its log file in the runtime directory; tokens never
appear there (registered as secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable

from localproxy.connect.attach import MAX_LINE, Reply, Request
from localproxy.connect.paths import SharedPaths
from localproxy.connect.source import SourceOptions, ThingSource
from localproxy.errors import ExitCode, LocalProxyError
from localproxy.local.listeners import ACCEPT_RETRY, exhaustion_advice
from localproxy.ops.peerlog import PeerLog
from localproxy.ops.runtime import stop_on_signals

log = logging.getLogger("localproxy.connect")
WHY_TIMEOUT = 10.0  # how long a dropped session may take to come back or fail for good
REQUEST_TIMEOUT = 10.0
# How often the idle check looks at the proxy's open connections: the proxy owns them
# (it has no per-connection close callback for us), and its counters are cheap to read.
IDLE_CHECK = 0.25

Announce = Callable[[Reply], None]


class SharedServer:
    def __init__(self, options: SourceOptions, paths: SharedPaths, idle_exit: float) -> None:
        self.paths = paths
        self.source = ThingSource(options)
        self.source.on_stopped = self._source_stopped
        self.idle_exit = idle_exit
        self.pending = 0  # attached clients not yet handed to the proxy
        self.attached = 0  # clients handed to the proxy, ever (close-on-exit needs one first)
        self.close_on_exit = False
        self.stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, announce: Announce) -> int:
        path = str(self.paths.socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: the client holds the start lock and found no server answering
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600, no window where it is wider
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.setblocking(False)
        identity = os.stat(path).st_ino
        with contextlib.suppress(OSError):
            self.paths.pid.write_text(str(os.getpid()), encoding="ascii")
        log.info("shared source of %s listening on %s (pid %d)", self.source.options.thing, path, os.getpid())
        announce(Reply(ok=True))
        accepting = asyncio.ensure_future(self._accept(listener))
        idling = asyncio.ensure_future(self._idle_watch())
        for task in (accepting, idling):
            task.add_done_callback(self._stop_on_crash)
        try:
            with stop_on_signals(self.stop):
                await self.stop.wait()
        finally:
            accepting.cancel()
            idling.cancel()
            listener.close()
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == identity:  # ours, not a successor's
                    os.unlink(path)
            for task in list(self._tasks):
                task.cancel()
            await self.source.close(close_tunnel=self.close_on_exit)
            with contextlib.suppress(OSError):
                if self.paths.pid.read_text(encoding="ascii") == str(os.getpid()):
                    self.paths.pid.unlink()
            log.info("shared source exits")
        return ExitCode.OK

    async def _accept(self, listener: socket.socket) -> None:
        await accept_forever(listener, self._attach_in_task)

    def _attach_in_task(self, conn: socket.socket) -> None:
        task = asyncio.ensure_future(self._attach(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one attached client --------------------------------------------------------

    async def _attach(self, conn: socket.socket) -> None:
        self.pending += 1
        handed = False
        try:
            handed = await self._serve_one(conn)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            self.pending -= 1
            if not handed:
                conn.close()

    async def _serve_one(self, conn: socket.socket) -> bool:
        """True once ``conn`` belongs to the proxy."""
        loop = asyncio.get_running_loop()
        try:
            request = Request.decode(await asyncio.wait_for(_read_line(loop, conn), REQUEST_TIMEOUT))
        except ValueError:
            await loop.sock_sendall(conn, Reply(error="bad attach request", code=ExitCode.USAGE).encode())
            return False
        if request.why:
            error = await self.source.why_dropped(WHY_TIMEOUT)
            reply = Reply(ok=True) if error is None else Reply(error=str(error), code=error.exit_code)
            await loop.sock_sendall(conn, reply.encode())
            return False
        if request.close_on_exit:
            self.close_on_exit = True

        def say(text: str) -> None:
            log.info("%s", text)
            with contextlib.suppress(OSError):  # a few short lines: the socket buffer takes them
                conn.send(Reply(say=text).encode())

        try:
            proxy = await self.source.ready_for(request.service, request.wait, say)
            await loop.sock_sendall(conn, Reply(ok=True).encode())
            await proxy.attach_socket(conn, request.service)
        except LocalProxyError as exc:
            log.warning("%s", exc)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, Reply(error=str(exc), code=exc.exit_code).encode())
            if self.source.fatal is not None:
                self.stop.set()
            return False
        self.attached += 1
        return True

    # --- lifetime -------------------------------------------------------------------

    async def _idle_watch(self) -> None:
        idle_since = time.monotonic()
        while True:
            await asyncio.sleep(IDLE_CHECK)
            now = time.monotonic()
            if self.pending or self.source.active_connections():
                idle_since = now
            elif self.close_on_exit and self.attached:
                log.info("last connection ended and --close-on-exit was given: closing the tunnel")
                self.stop.set()
            elif now - idle_since >= self.idle_exit:
                log.info("no connection for %g s: exiting", self.idle_exit)
                self.stop.set()

    def _stop_on_crash(self, task: asyncio.Task[None]) -> None:
        """A bug in the accept or idle loop must not leave a server that never exits."""
        if not task.cancelled() and task.exception() is not None:
            log.critical("internal error in the shared source, please report it", exc_info=task.exception())
            self.stop.set()

    def _source_stopped(self, error: LocalProxyError | None) -> None:
        """The source proxy stopped: remember why for clients (status file), stop if for good."""
        if error is not None:
            status = {"code": error.exit_code, "message": str(error), "time": time.time()}
            with contextlib.suppress(OSError):
                self.paths.status.write_text(json.dumps(status), encoding="utf-8")
        if self.source.fatal is not None:
            self.stop.set()


async def accept_forever(
    listener: socket.socket, handle: Callable[[socket.socket], None], peer_log: PeerLog | None = None
) -> None:
    """Hand each accepted connection to ``handle``, until cancelled.

    Out of descriptors (EMFILE, ENFILE...), the failure is logged (rate-limited, with
    what to raise) and accepting resumes every :data:`ACCEPT_RETRY` s, the clients
    waiting in the backlog meanwhile: the shared source and its sessions live on
    (before, the failed accept ended the server and every ssh session through it).
    """
    loop = asyncio.get_running_loop()
    peer_log = peer_log or PeerLog()
    failing = False
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        except OSError as exc:
            failing = True
            peer_log.log(
                log, logging.ERROR, "attach-accept-failed",
                "cannot accept a connect client: %s%s; clients wait in the backlog, retrying every %g s",
                exc.strerror or exc, exhaustion_advice(exc), ACCEPT_RETRY,
            )
            await asyncio.sleep(ACCEPT_RETRY)
            continue
        if failing:
            failing = False
            peer_log.log(log, logging.WARNING, "attach-accept-resumed", "accepting connect clients again")
        handle(conn)


async def _read_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The request line. The client sends nothing more before our answer, so nothing is over-read."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(conn, 4096)
        if not chunk or len(data) + len(chunk) > MAX_LINE:
            raise ValueError("no request line")
        data += chunk
    return data
