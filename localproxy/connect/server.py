"""The shared source: ``python -m localproxy.connect --serve``, one per user and thing.

Started (detached) by the first ``localproxy connect`` of a thing; listens on a private
Unix socket (``paths.py``) where later ``connect`` processes attach (``attach.py``), so all
of them share ONE source proxy and ONE tunnel as simultaneous connections. Exits after
``--idle-exit`` seconds without a connection, or at once when the last connection of a
``--close-on-exit`` client ends (closing the tunnel). Logs go to its log file in the
runtime directory; tokens never appear there (registered as secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

from localproxy.connect.attach import MAX_LINE, Reply, Request
from localproxy.connect.paths import SharedPaths
from localproxy.connect.source import SourceOptions, ThingSource
from localproxy.errors import ExitCode, LocalProxyError
from localproxy.ops.runtime import stop_on_signals

log = logging.getLogger("localproxy.connect")
CHUNK = 256 * 1024
WHY_TIMEOUT = 10.0  # how long a dropped session may take to come back or fail for good


class SharedServer:
    def __init__(self, options: SourceOptions, paths: SharedPaths, idle_exit: float) -> None:
        self.paths = paths
        self.source = ThingSource(options)
        self.source.on_stopped = self._source_stopped
        self.idle_exit = idle_exit
        self.active = 0
        self.close_on_exit = False
        self.stop = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def serve(self, announce: Announce) -> int:
        path = str(self.paths.socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: the client holds the start lock and found no server answering
        old_umask = os.umask(0o177)  # the socket is created 0600, no window where it is wider
        try:
            server = await asyncio.start_unix_server(self._attach, path=path, limit=MAX_LINE)
        finally:
            os.umask(old_umask)
        identity = os.stat(path).st_ino
        with contextlib.suppress(OSError):
            self.paths.pid.write_text(str(os.getpid()), encoding="ascii")
        log.info("shared source of %s listening on %s (pid %d)", self.source.options.thing, path, os.getpid())
        announce(Reply(ok=True))
        self._arm_idle()
        try:
            with stop_on_signals(self.stop):
                await self.stop.wait()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == identity:  # ours, not a successor's
                    os.unlink(path)
            for writer in list(self._links):
                writer.close()
            await self.source.close(close_tunnel=self.close_on_exit)
            with contextlib.suppress(OSError):
                if self.paths.pid.read_text(encoding="ascii") == str(os.getpid()):
                    self.paths.pid.unlink()
            log.info("shared source exits")
        return ExitCode.OK

    # --- one attached client --------------------------------------------------------

    async def _attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links.add(writer)
        self.active += 1
        self._disarm_idle()
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(writer)
            writer.close()
            self.active -= 1
            if self.active == 0:
                if self.close_on_exit:
                    log.info("last connection ended and --close-on-exit was given: closing the tunnel")
                    self.stop.set()
                else:
                    self._arm_idle()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = Request.decode(await asyncio.wait_for(reader.readline(), 10))
        except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError):
            writer.write(Reply(error="bad attach request", code=ExitCode.USAGE).encode())
            return
        if request.close_on_exit:
            self.close_on_exit = True

        def say(text: str) -> None:
            log.info("%s", text)
            if not writer.is_closing():
                writer.write(Reply(say=text).encode())

        try:
            remote_reader, remote_writer = await self.source.open_connection(request.service, request.wait, say)
        except LocalProxyError as exc:
            log.warning("%s", exc)
            writer.write(Reply(error=str(exc), code=exc.exit_code).encode())
            await writer.drain()
            if self.source.fatal is not None:
                self.stop.set()
            return
        writer.write(Reply(ok=True).encode())

        async def explain() -> None:
            # Before the client sees its connection end: the status file tells it why, if not a normal end.
            error = await self.source.why_dropped(WHY_TIMEOUT)
            if error is not None:
                self._write_status(error)

        await _splice(reader, writer, remote_reader, remote_writer, explain)

    # --- lifetime -------------------------------------------------------------------

    def _source_stopped(self, error: LocalProxyError | None) -> None:
        """The source proxy stopped: tell attached clients why (they read the status file)."""
        if error is not None:
            self._write_status(error)
        for writer in list(self._links):
            writer.close()
        if self.source.fatal is not None:
            self.stop.set()

    def _write_status(self, error: LocalProxyError) -> None:
        status = {"code": error.exit_code, "message": str(error), "time": time.time()}
        with contextlib.suppress(OSError):
            self.paths.status.write_text(json.dumps(status), encoding="utf-8")

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle_exit, self._idle)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        if self.active == 0:
            log.info("no connection for %g s: exiting", self.idle_exit)
            self.stop.set()


async def _splice(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    remote_reader: asyncio.StreamReader, remote_writer: asyncio.StreamWriter,
    explain: Callable[[], Awaitable[None]],
) -> None:  # fmt: skip
    """Both directions until both ended; a reset either way ends both at once.

    ``explain`` runs when the remote side ends, before the client is told (EOF or close).
    """
    tasks = {
        asyncio.ensure_future(_pipe(reader, remote_writer)),
        asyncio.ensure_future(_pipe(remote_reader, writer, explain)),
    }
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not all(task.result() for task in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        remote_writer.close()
        writer.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, before_end: Callable[[], Awaitable[None]] | None = None
) -> bool:
    """Copy until EOF, then half-close (ssh and scp rely on EOF travelling each way).

    True: a clean end; False: a reset or error.
    """
    clean = True
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        clean = False
    if before_end is not None:
        await before_end()
    if clean and writer.can_write_eof() and not writer.is_closing():
        try:
            writer.write_eof()
        except (ConnectionError, OSError):
            clean = False
    return clean


Announce = Callable[[Reply], None]
