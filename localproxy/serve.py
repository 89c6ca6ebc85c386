"""Run one proxy as a program (the ``localproxy`` command): signals, exit code,
the metrics exporter and systemd notifications around a :class:`LocalProxy`.

A face: the library's ``LocalProxy`` knows nothing of processes or service managers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import ExitCode, LocalProxyError
from localproxy.events import (
    Connected,
    ConnectionRejected,
    ConnectionStarted,
    Disconnected,
    ErrorEvent,
    StreamStarted,
    TunnelReady,
)
from localproxy.ops.operations import Operations, OpsOptions, proxy_status
from localproxy.ops.runtime import stop_on_signals, tune_allocator
from localproxy.proxy.local_proxy import LocalProxy

__all__ = ["run_proxy", "run_stdio", "serve_proxy"]

logger = logging.getLogger("localproxy.proxy")


@contextlib.asynccontextmanager
async def serve_proxy(options: OpsOptions, proxy: LocalProxy) -> AsyncIterator[Operations]:
    """Around a not yet started proxy: metrics of it, READY=1 when its tunnel is ready;
    the allocator tuned when the first stream starts (an idle proxy never loads ``ctypes``)."""
    operations = Operations(options, lambda: ([proxy.stats()], None))
    await operations.start()
    services: tuple[str, ...] = ()
    tuned = False

    def on_event(event: object) -> None:
        nonlocal services, tuned
        if not tuned and isinstance(event, (StreamStarted, ConnectionStarted)):
            tuned = True
            tune_allocator()
        if isinstance(event, TunnelReady):
            services = event.services
        elif not isinstance(event, (Connected, Disconnected, ErrorEvent)):
            return  # per-connection events do not change the status
        operations.report(isinstance(event, TunnelReady), proxy_status(proxy.stats(), services))

    unsubscribe = proxy.subscribe(on_event)
    try:
        yield operations
    finally:
        unsubscribe()
        await operations.close()



async def run_proxy(config: ProxyConfig, operations: OpsOptions | None = None) -> int:
    """Run a proxy until SIGINT/SIGTERM (exit 0) or a fatal error (its exit code).

    ``operations``: metrics exporter; systemd is notified whenever ``NOTIFY_SOCKET`` is set.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop):
            proxy = LocalProxy(config)
            async with serve_proxy(operations or OpsOptions(), proxy), proxy:
                closed = loop.create_task(proxy.wait_closed())
                stopping = loop.create_task(stop.wait())
                await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not closed.done():
                    logger.info("Stopping: closing local connections and the websocket")
                    closed.cancel()
                    return 0
                closed.result()  # raises the fatal error, if any
                return 0
    except LocalProxyError as error:
        # Its message is written for the user, maybe on several lines (token advice).
        logger.error("%s", error, extra={"multiline": True})
        return error.exit_code


async def run_stdio(config: ProxyConfig, service: str, operations: OpsOptions | None = None) -> int:
    """``--stdio``: one connection to ``service`` over stdin/stdout, then exit.

    Exit 0 when either side ends (stdin closed, the far end closed, SIGINT/SIGTERM);
    a fatal error of the proxy (refused token, closed tunnel, unknown service...)
    ends it with that error's exit code; a connection cut by a lost websocket
    session or refused by the proxy, with ``CONNECTION_FAILED``.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    lost: list[str] = []  # why the connection was cut under us, if it was

    def on_event(event: object) -> None:
        if isinstance(event, Disconnected):
            lost.append(f"the websocket session ended ({event.reason})")
        elif isinstance(event, ConnectionRejected):
            lost.append(f"the proxy refused the connection ({event.reason})")

    try:
        with stop_on_signals(stop):
            proxy = LocalProxy(config)
            async with serve_proxy(operations or OpsOptions(), proxy), proxy:
                closed = loop.create_task(proxy.wait_closed())
                stopping = loop.create_task(stop.wait())
                ready = loop.create_task(_ready(proxy))
                try:
                    await asyncio.wait({closed, stopping, ready}, return_when=asyncio.FIRST_COMPLETED)
                    if ready.done() and not ready.cancelled() and ready.exception() is None:
                        proxy.subscribe(on_event)
                        relay = loop.create_task(proxy.serve_stdio(service or None), name="stdio")
                        await asyncio.wait({closed, stopping, relay}, return_when=asyncio.FIRST_COMPLETED)
                        relay.cancel()
                        await asyncio.gather(relay, return_exceptions=True)
                        _end_stdout()
                    # A proxy that stopped (its fatal error also ended the connection) says why.
                    if proxy.stopped or (ready.done() and not ready.cancelled() and ready.exception()):
                        await closed  # raises the fatal error, if any
                    if lost and not stop.is_set():
                        logger.error("The connection over standard input/output was cut: %s", lost[0])
                        return ExitCode.CONNECTION_FAILED
                    return ExitCode.OK
                finally:
                    for task in (closed, stopping, ready):
                        task.cancel()
    except LocalProxyError as error:
        logger.error("%s", error)
        return error.exit_code


async def _ready(proxy: LocalProxy) -> None:
    await proxy.ready


def _end_stdout() -> None:
    """The parent (ssh) sees EOF now, not after the websocket's close handshake at exit."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)
