"""``--stdio SERVICE``: one connection over stdin/stdout, and the reusable relay under it.

The command runs as a real ``python -m localproxy`` child against the emulator,
with a destination LocalProxy in front of a real TCP app; stdin/stdout are pipes.
``relay_stdio`` is also checked on its own with pipes (the loop watches them) and
regular files (the thread path, the one Windows takes for every descriptor).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from localproxy import DestinationTarget, LocalProxy, Mode, ProxyConfig, ServiceEndpoint
from localproxy.errors import ExitCode
from localproxy.local.stdio import relay_stdio
from localproxy.settings import Settings
from localproxy.testing.processes import echo

TIMEOUT = 20.0
FAST = Settings(retry_delay_ms=50, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=50)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def destination(emulator: Any, handler: Handler, service: str = "ECHO") -> AsyncIterator[Any]:
    """An app, a tunnel with ``service`` and a connected destination proxy; yields the tunnel."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    tunnel = emulator.open_tunnel(services=[service])
    config = ProxyConfig(
        Mode.DESTINATION, tunnel.destination_token, ServiceEndpoint.parse(emulator.data_url),
        services={service: DestinationTarget("127.0.0.1", server.sockets[0].getsockname()[1])}, settings=FAST,
    )  # fmt: skip
    try:
        async with LocalProxy(config):
            await emulator.wait_connected(tunnel.tunnel_id, "destination", TIMEOUT)
            yield tunnel
    finally:
        server.close()


async def start_stdio(emulator: Any, token: str, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy", "-e", emulator.data_url, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def reaped(process: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """Nothing left running: the child is killed if a test failed before it exited."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def finish(process: asyncio.subprocess.Process) -> tuple[int, bytes, str]:
    """Wait (bounded) for the child to exit: (exit code, stdout, stderr)."""
    stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return process.returncode, stdout, stderr.decode(errors="replace")


async def test_data_both_ways_then_stdin_eof_exits_0(tunneling_service: Any) -> None:
    async with destination(tunneling_service, echo) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO", "-v", "5")
        async with reaped(process):
            assert process.stdin is not None and process.stdout is not None
            payload = os.urandom(1 << 20)
            process.stdin.write(payload)
            await process.stdin.drain()
            echoed = await asyncio.wait_for(process.stdout.readexactly(len(payload)), TIMEOUT)
            assert echoed == payload
            process.stdin.close()  # the end of input ends the connection, then the process
            code, rest, logs = await finish(process)
    assert code == ExitCode.OK and rest == b""
    assert "Accepted stdio connection to ECHO" in logs  # logs on stderr, never in the data
    assert "Traceback" not in logs


async def test_stdin_closed_at_once(tunneling_service: Any) -> None:
    async with destination(tunneling_service, echo) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO")
        async with reaped(process):
            assert process.stdin is not None
            process.stdin.close()
            code, out, logs = await finish(process)
    assert code == ExitCode.OK and out == b""
    assert "Traceback" not in logs


async def test_far_end_closing_ends_the_process(tunneling_service: Any) -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-hello\r\n" + b"x" * 300_000)
        await writer.drain()
        writer.close()

    async with destination(tunneling_service, hello) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO")
        async with reaped(process):
            # stdin stays open: the far end's close alone ends the process.
            assert process.stdout is not None
            out = await asyncio.wait_for(process.stdout.read(), TIMEOUT)
            code = await asyncio.wait_for(process.wait(), TIMEOUT)
    assert code == ExitCode.OK
    assert out == b"SSH-2.0-hello\r\n" + b"x" * 300_000


async def test_one_access_token_serves_successive_runs_with_a_client_token_file(
    tunneling_service: Any, tmp_path: Path
) -> None:
    token_file = str(tmp_path / "client-token")
    async with destination(tunneling_service, echo) as tunnel:
        for run in range(2):
            process = await start_stdio(
                tunneling_service, tunnel.source_token, "--stdio", "ECHO", "--client-token-file", token_file
            )
            async with reaped(process):
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(b"run %d\n" % run)
                assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == b"run %d\n" % run
                process.stdin.close()
                code, _, logs = await finish(process)
            assert code == ExitCode.OK, logs
        # Without the file the spent access token is refused: the file is what made reuse work.
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO")
        async with reaped(process):
            code, _, logs = await finish(process)
    assert code == ExitCode.CLIENT_TOKEN_MISMATCH, logs  # a fresh client token per run without it
    assert "Traceback" not in logs


async def test_unknown_service_is_a_config_error(tunneling_service: Any) -> None:
    async with destination(tunneling_service, echo) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "WEB")
        async with reaped(process):
            code, out, logs = await finish(process)
    assert code == ExitCode.CONFIG and out == b""
    assert "WEB" in logs and "not services of the tunnel" in logs and "Traceback" not in logs


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--stdio", "SSH", "-d", "22"], "--stdio works in source mode only"),
        (["--stdio", "SSH", "-m", "dst"], "--stdio works in source mode only"),
        (["--stdio", "SSH", "-s", "SSH=5555"], "given both to --stdio and to -s"),
        (["--stdio", "S S H"], "Invalid service ID for --stdio"),
    ],
)
async def test_bad_stdio_command_lines(args: list[str], needle: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy", "-t", "token", "-e", "127.0.0.1:9", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    async with reaped(process):
        code, out, logs = await finish(process)
    assert code == ExitCode.USAGE and out == b""
    assert needle in logs and "Traceback" not in logs


def test_help_lists_stdio() -> None:
    from localproxy.config.options import help_text

    assert "--stdio arg" in help_text()


# --- relay_stdio on its own: pipes (the loop watches them) and files (threads) -----------------------


@contextlib.asynccontextmanager
async def connection_to(handler: Handler) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A stream pair whose far end is ``handler`` (a socket pair, as open_connection gives)."""
    ours, theirs = socket.socketpair()
    far = asyncio.get_running_loop().create_task(handler(*await asyncio.open_connection(sock=theirs)))
    try:
        yield await asyncio.open_connection(sock=ours)
    finally:
        await asyncio.wait_for(asyncio.gather(far, return_exceptions=True), TIMEOUT)


async def test_relay_over_pipes_restores_blocking_flags() -> None:
    await _relay_over_pipes()


def test_relay_over_pipes_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_relay_over_pipes())


async def _relay_over_pipes() -> None:
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    payload = os.urandom(3 << 20)
    try:
        blocking_before = os.get_blocking(in_read), os.get_blocking(out_write)

        def feed() -> None:
            with open(in_write, "wb", closefd=False) as stream:
                stream.write(payload)
            os.close(in_write)

        def drain() -> bytes:
            chunks = []
            while data := os.read(out_read, 1 << 20):
                chunks.append(data)
            return b"".join(chunks)

        draining = asyncio.create_task(asyncio.to_thread(drain))
        async with connection_to(echo) as (reader, writer):
            feeding = asyncio.create_task(asyncio.to_thread(feed))
            relay = asyncio.create_task(relay_stdio(reader, writer, stdin_fd=in_read, stdout_fd=out_write))
            # stdin's EOF ends the connection; the echo of what was sent before may be cut short.
            await asyncio.wait_for(asyncio.gather(feeding, relay), TIMEOUT)
        assert (os.get_blocking(in_read), os.get_blocking(out_write)) == blocking_before
        os.close(out_write)
        out_write = -1
        echoed = await asyncio.wait_for(draining, TIMEOUT)
        assert len(echoed) > 0 and payload.startswith(echoed)
    finally:
        for fd in (in_read, out_read, out_write):
            if fd >= 0:
                os.close(fd)


async def test_relay_over_regular_files_uses_threads(tmp_path: Path) -> None:
    """The path Windows takes: the loop cannot watch these, blocking calls in threads do."""
    source, sink = tmp_path / "in", tmp_path / "out"
    source.write_bytes(b"")
    got = bytearray()
    far_saw_eof = asyncio.Event()

    async def far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"y" * 2_000_000)
        await writer.drain()
        got.extend(await reader.read())  # the relay's EOF (stdin: an empty file)
        far_saw_eof.set()
        writer.close()

    with open(source, "rb") as stdin, open(sink, "wb") as stdout:
        async with connection_to(far) as (reader, writer):
            await asyncio.wait_for(
                relay_stdio(reader, writer, stdin_fd=stdin.fileno(), stdout_fd=stdout.fileno()), TIMEOUT
            )
    assert far_saw_eof.is_set() and got == b""
    assert sink.read_bytes() == b"y" * 2_000_000


async def test_relay_ends_when_the_far_end_closes_while_stdin_stays_open(tmp_path: Path) -> None:
    """A stdin that never ends (a pipe nobody writes) does not hold the relay: the far end ends it."""
    in_read, in_write = os.pipe()
    sink = tmp_path / "out"

    async def far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    try:
        with open(sink, "wb") as stdout:
            async with connection_to(far) as (reader, writer):
                await asyncio.wait_for(
                    relay_stdio(reader, writer, stdin_fd=in_read, stdout_fd=stdout.fileno()), TIMEOUT
                )
        assert sink.read_bytes() == b"bye"
    finally:
        os.close(in_write)  # the reading thread sees EOF and ends
        os.close(in_read)


async def test_a_lost_session_cuts_the_connection_with_exit_7(tunneling_service: Any) -> None:
    async with destination(tunneling_service, echo) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO")
        async with reaped(process):
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(b"before\n")
            assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == b"before\n"
            await tunneling_service.drop(tunnel.tunnel_id, "source")
            code, _, logs = await finish(process)
    assert code == ExitCode.CONNECTION_FAILED, logs
    assert "The connection over standard input/output was cut: the websocket session ended" in logs
    assert "Traceback" not in logs


async def test_empty_service_means_the_tunnels_only_service(tunneling_service: Any) -> None:
    async with destination(tunneling_service, echo) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "")
        async with reaped(process):
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(b"only one\n")
            assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == b"only one\n"
            process.stdin.close()
            code, _, logs = await finish(process)
    assert code == ExitCode.OK, logs


async def test_dev_null_on_both_sides(tunneling_service: Any) -> None:
    """/dev/null cannot be polled (epoll: EPERM): threads take it, on uvloop (the CLI) too."""
    async with destination(tunneling_service, echo) as tunnel:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = tunnel.source_token
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localproxy", "-e", tunneling_service.data_url, "--stdio", "ECHO",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        async with reaped(process):
            code, _, logs = await finish(process)
    assert code == ExitCode.OK, logs
    assert "Traceback" not in logs


async def test_relay_with_dev_null_stdin_on_the_stdlib_loop() -> None:
    async def far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"unread")
        await writer.drain()
        assert await reader.read() == b""  # stdin (/dev/null) ended at once
        writer.close()

    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as stdout:
        async with connection_to(far) as (reader, writer):
            await asyncio.wait_for(
                relay_stdio(reader, writer, stdin_fd=stdin.fileno(), stdout_fd=stdout.fileno()), TIMEOUT
            )


async def _relay_over_one_socket() -> None:
    """stdin and stdout the same socket (inetd, systemd, socat): messages both ways, then EOF."""

    async def far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    inner, parent = socket.socketpair()
    try:
        async with connection_to(far) as (reader, writer):
            relay = asyncio.create_task(
                relay_stdio(reader, writer, stdin_fd=inner.fileno(), stdout_fd=inner.fileno())
            )
            parent_reader, parent_writer = await asyncio.open_connection(sock=parent)
            for n in range(5):
                parent_writer.write(b"hello%d" % n)
                assert await asyncio.wait_for(parent_reader.readexactly(6), TIMEOUT) == b"HELLO%d" % n
            parent_writer.write_eof()
            await asyncio.wait_for(relay, TIMEOUT)
            assert await asyncio.wait_for(parent_reader.read(), TIMEOUT) == b""  # EOF, though `inner` is open
            parent_writer.close()
    finally:
        inner.close()


async def test_relay_over_one_socket_for_both() -> None:
    await _relay_over_one_socket()


def test_relay_over_one_socket_for_both_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_relay_over_one_socket())


async def test_stdout_nobody_reads_stops_the_far_end(tunneling_service: Any) -> None:
    """Backpressure through --stdio: an unread stdout stops the app's writes; then all arrives."""
    written = 0
    blocked = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        chunk = b"d" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):  # at most 64 MiB
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except asyncio.TimeoutError:
                    blocked.set()
                    await writer.drain()
                written += len(chunk)
                if blocked.is_set() and written >= 8 * 1024 * 1024:
                    break
        writer.close()

    async with destination(tunneling_service, app) as tunnel:
        process = await start_stdio(tunneling_service, tunnel.source_token, "--stdio", "ECHO")
        async with reaped(process):
            assert process.stdout is not None
            await asyncio.wait_for(blocked.wait(), TIMEOUT)
            assert written < 48 * 1024 * 1024  # stopped long before 64 MiB
            total = 0
            while data := await asyncio.wait_for(process.stdout.read(1 << 20), TIMEOUT):
                total += len(data)
            code = await asyncio.wait_for(process.wait(), TIMEOUT)
    assert code == ExitCode.OK
    assert total == written >= 8 * 1024 * 1024
