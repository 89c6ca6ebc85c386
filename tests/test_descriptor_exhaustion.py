"""Issue 22, item 5: running out of descriptors is logged, with what to raise, and the proxy recovers.

A child process (``resource.setrlimit(RLIMIT_NOFILE)`` there, never in the test
process) runs a source proxy against a service written in the child
(localproxy.testing.hostile); the test opens more local clients than the child
has descriptors for, reads the child's log, frees the descriptors and checks a
new client is served. On uvloop (the program's loop) and on asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import asyncio, resource, sys

    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.ops.logs import setup_logging
    from localproxy.ops.runtime import run_program
    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.settings import Settings
    from localproxy.testing.hostile import HostileService
    from localproxy.types import Mode, ServiceEndpoint, SourcePort
    from localproxy.wire.codec import MessageType

    LIMIT = int(sys.argv[1])

    async def main() -> None:
        setup_logging(4, sys.stdout)
        async with HostileService(("SSH",)) as service:
            config = ProxyConfig(
                mode=Mode.SOURCE, access_token="AQGAAFdTestToken", endpoint=ServiceEndpoint.parse(service.url),
                services={"SSH": SourcePort(0)}, bind_address="127.0.0.1",
                settings=Settings(retry_delay_ms=50, ping_period_ms=60_000),
            )
            async with LocalProxy(config) as proxy:
                await asyncio.wait_for(proxy.ready, 10)
                session = service.sessions[0]
                resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
                print("PORT", proxy.ports["SSH"], flush=True)
                loop = asyncio.get_running_loop()
                end = loop.time() + 60
                while loop.time() < end:  # bounded: the test ends it sooner
                    for message in session.received:
                        if message.type == MessageType.DATA and bytes(message.payload) == b"after":
                            print("SERVED after", flush=True)
                            return
                    await asyncio.sleep(0.05)

    if sys.argv[2] == "uvloop":
        run_program(main())
    else:
        asyncio.run(main())
    """
)


class Child:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def wait_line(self, pattern: str, timeout: float = 20.0) -> str:
        compiled = re.compile(pattern)
        for line in self.lines:
            if compiled.search(line):
                return line
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"child ended without {pattern!r}:\n" + "\n".join(self.lines))
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if compiled.search(line):
                    return line


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_accept_out_of_descriptors_is_logged_and_recovers(loop_kind: str) -> None:
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, "48", loop_kind,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    child = Child(process)
    clients: list[socket.socket] = []
    try:
        port = int((await child.wait_line(r"^PORT \d+")).split()[1])
        loop = asyncio.get_running_loop()
        for _ in range(80):  # more than the child's 48 descriptors
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))  # the kernel's backlog accepts them
            clients.append(sock)
        line = await child.wait_line(r"cannot accept a connection")
        assert "Too many open files" in line and "ulimit -n" in line and "LimitNOFILE=" in line
        assert "[error]" in line
        for sock in clients:
            sock.close()
        clients.clear()
        # Descriptors free up: the listener accepts again and a new client is served.
        await child.wait_line(r"accepting connections again")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"after")
        await writer.drain()
        await child.wait_line(r"^SERVED after")
        writer.close()
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        for sock in clients:
            sock.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Rate-limited: not one line per failed accept.
    failures = [line for line in child.lines if "cannot accept a connection" in line]
    assert 1 <= len(failures) <= 6, failures


DESTINATION_CHILD = textwrap.dedent(
    """
    import asyncio, resource, sys

    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.ops.logs import setup_logging
    from localproxy.ops.runtime import run_program
    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.settings import Settings
    from localproxy.testing.hostile import HostileService
    from localproxy.types import DestinationTarget, Mode, ServiceEndpoint
    from localproxy.wire.codec import Message, MessageType as T

    LIMIT, APP_PORT = int(sys.argv[1]), int(sys.argv[2])

    async def until(check, what):
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while loop.time() < end:  # bounded
            if check():
                return
            await asyncio.sleep(0.05)
        raise SystemExit(f"timed out waiting for {what}")

    async def main() -> None:
        setup_logging(4, sys.stdout)
        async with HostileService(("SSH",)) as service:
            config = ProxyConfig(
                mode=Mode.DESTINATION, access_token="AQGAAFdTestToken", endpoint=ServiceEndpoint.parse(service.url),
                services={"SSH": DestinationTarget("127.0.0.1", APP_PORT)},
                settings=Settings(retry_delay_ms=50, ping_period_ms=60_000, tcp_connection_retry_count=0),
            )
            async with LocalProxy(config) as proxy:
                await asyncio.wait_for(proxy.ready, 10)
                session = service.sessions[0]
                resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
                starts = [Message(T.CONNECTION_START, 1, service_id="SSH", connection_id=c) for c in range(2, 81)]
                await session.send(Message(T.STREAM_START, 1, service_id="SSH", connection_id=1), *starts)
                resets = lambda: [m for m in session.received if m.type == T.CONNECTION_RESET]
                await until(lambda: len(resets()) > 0, "a failed connect")
                print("RESETS", len(resets()), flush=True)
                # The stream ends: its connections close and free their descriptors.
                await session.send(Message(T.STREAM_RESET, 1, service_id="SSH"))
                await until(lambda: not proxy.stats().active_connections.get("SSH"), "the connections to close")
                await session.send(Message(T.STREAM_START, 2, service_id="SSH", connection_id=1))
                await session.send(Message(T.DATA, 2, payload=b"after", service_id="SSH", connection_id=1))
                echoed = lambda: any(m.type == T.DATA and m.stream_id == 2 for m in session.received)
                await until(echoed, "the echo")
                print("SERVED after", flush=True)

    run_program(main())
    """
)


async def test_connect_out_of_descriptors_is_logged_and_recovers() -> None:
    from localproxy.testing.processes import echo_app

    app, app_port = await echo_app()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DESTINATION_CHILD, "48", str(app_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    child = Child(process)
    try:
        await child.wait_line(r"^SERVED after")
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        app.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    failed = [line for line in child.lines if "Could not connect" in line]
    assert failed and all("ulimit -n" in line and "LimitNOFILE=" in line for line in failed if "more in the last" not in line)
    assert len(failed) <= 6  # rate-limited (a summary comes when the window ends or the proxy stops)


def test_connect_failure_advice_names_the_limits() -> None:
    import errno

    from localproxy.local.adapters import exhaustion_advice

    emfile = exhaustion_advice(OSError(errno.EMFILE, "Too many open files"))
    assert "ulimit -n" in emfile and "LimitNOFILE=" in emfile
    assert "fs.file-max" in exhaustion_advice(OSError(errno.ENFILE, "Too many open files in system"))
    assert exhaustion_advice(OSError(errno.ECONNREFUSED, "Connection refused")) == ""


CONNECT_SERVER_CHILD = textwrap.dedent(
    """
    import asyncio, os, resource, socket, sys, tempfile

    from localproxy.connect.server import accept_forever
    from localproxy.ops.logs import setup_logging
    from localproxy.ops.runtime import run_program

    LIMIT, CLIENTS = int(sys.argv[1]), int(sys.argv[3])

    async def main() -> None:
        setup_logging(4, sys.stdout)
        loop = asyncio.get_running_loop()
        path = os.path.join(tempfile.mkdtemp(), "attach.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        accepted = 0
        done = asyncio.Event()

        def handle(conn: socket.socket) -> None:  # holds each client for a while: descriptors run out
            nonlocal accepted
            accepted += 1
            print("ACCEPTED", accepted, flush=True)
            loop.call_later(1.0, conn.close)
            if accepted == CLIENTS:
                done.set()

        task = asyncio.ensure_future(accept_forever(listener, handle))
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print("PATH", path, flush=True)
        await asyncio.wait_for(done.wait(), 60)
        assert not task.done()
        task.cancel()
        print("ALL ACCEPTED", flush=True)

    if sys.argv[2] == "uvloop":
        run_program(main())
    else:
        asyncio.run(main())
    """
)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
async def test_connect_server_accept_out_of_descriptors_is_logged_and_recovers(loop_kind: str) -> None:
    """The shared source of ``localproxy connect`` keeps accepting (and its sessions) when
    descriptors run out, instead of ending with every ssh session through it."""
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")
    clients_count = 40
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONNECT_SERVER_CHILD, "24", loop_kind, str(clients_count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    child = Child(process)
    clients: list[socket.socket] = []
    try:
        path = (await child.wait_line(r"^PATH ")).split(" ", 1)[1]
        loop = asyncio.get_running_loop()
        for _ in range(clients_count):  # more than the child's 24 descriptors, all at once
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await loop.sock_connect(sock, path)  # the kernel's backlog takes them
            clients.append(sock)
        line = await child.wait_line(r"cannot accept a connect client")
        assert "Too many open files" in line and "ulimit -n" in line and "[error]" in line
        await child.wait_line(r"accepting connect clients again")
        await child.wait_line(r"^ALL ACCEPTED", timeout=60)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        for sock in clients:
            sock.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    failures = [line for line in child.lines if "cannot accept a connect client" in line]
    assert 1 <= len(failures) <= 6, failures  # rate-limited: not one line per failed accept
