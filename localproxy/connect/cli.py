"""``localproxy connect THING SERVICE``: one connection to SERVICE on THING over stdin/stdout.

Made to be an ssh ProxyCommand::

    ssh -o ProxyCommand='localproxy connect %h SSH -r us-east-1' user@device-42

stdout carries only the connection's bytes; every message goes to stderr. The source
proxy is shared (``server.py``): this process attaches to it, starting it first if needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, NoReturn

from localproxy.connect.attach import MAX_LINE, Reply, Request
from localproxy.connect.paths import SHARING, SharedPaths, shared_paths
from localproxy.errors import ConfigError, ExitCode, LocalProxyError, UsageError

PROG = "localproxy connect"
TRY_HELP = f"Try '{PROG} --help' for more information."
START_TIMEOUT = 20.0  # the shared server's start (imports, socket), not the device's wait
LOCK_TIMEOUT = 60.0
WHY_WAIT = 15.0  # the server's own bound (server.WHY_TIMEOUT) and some
DEFAULT_VERBOSITY = 4  # another connect starting the server and waiting for the device


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{PROG}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Open one connection to SERVICE on the AWS IoT thing THING over stdin/stdout "
        "(e.g. as ssh's ProxyCommand), reusing the thing's open tunnel and sharing one source proxy.",
    )
    parser.add_argument("thing", metavar="THING", help="the device's AWS IoT thing name (ssh: %%h)")
    parser.add_argument("service", metavar="SERVICE", help="the service on the device, e.g. SSH")
    parser.add_argument("-r", "--region", help="AWS region (default: the AWS configuration's)")
    parser.add_argument(
        "-e", "--proxy-endpoint", metavar="ENDPOINT",
        help="data-plane endpoint (default: the region's); ws://HOST:PORT for the emulator, whose "
        "control API is given by AWS_ENDPOINT_URL",
    )  # fmt: skip
    parser.add_argument("--wait", type=_seconds, default=60.0, metavar="SECONDS",
                        help="how long to wait for the device to connect (default 60)")  # fmt: skip
    parser.add_argument("--tunnel-minutes", type=_minutes, default=720, metavar="MINUTES",
                        help="lifetime of a tunnel this command opens, 1-720 (default 720)")  # fmt: skip
    parser.add_argument("--close-on-exit", action="store_true",
                        help="close the tunnel when its last connection ends (default: keep it for reuse)")  # fmt: skip
    parser.add_argument("--idle-exit", type=_seconds, default=300.0, metavar="SECONDS",
                        help="the shared source exits after this long without a connection (default 300)")  # fmt: skip
    parser.add_argument("--no-share", action="store_true",
                        help="run a source of its own in this process for this one connection (always so "
                        "where there are no Unix sockets, e.g. Windows); never takes a tunnel another source holds")  # fmt: skip
    parser.add_argument("-v", "--verbose", type=int, default=DEFAULT_VERBOSITY, metavar="0..6",
                        help="log level of the shared source's log file (default 4: info)")  # fmt: skip
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the shared server itself
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be 0 to 86400 seconds, got {text!r}")
    return value


def _minutes(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 720:
        raise argparse.ArgumentTypeError(f"must be 1 to 720 minutes, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
        if args.serve:
            from localproxy.connect.serve_main import serve_main

            return serve_main(args)
        return asyncio.run(connect(args))
    except UsageError as exc:
        say(str(exc).removeprefix(f"{PROG}: "))
        print(TRY_HELP, file=sys.stderr)
        return ExitCode.USAGE
    except LocalProxyError as exc:
        say(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


async def connect(args: argparse.Namespace) -> int:
    request = Request(args.service, args.wait, args.close_on_exit)
    if args.no_share or not SHARING:
        return await _connect_here(args, request)
    paths = shared_paths(args.thing, args.region, args.proxy_endpoint, os.environ.get("AWS_ENDPOINT_URL"))
    started = time.time()
    sock = _attach(paths)
    if sock is None:
        lock = _StartLock(paths)
        await asyncio.to_thread(lock.acquire)
        try:
            sock = _attach(paths)  # another connect may have started it meanwhile
            if sock is None:
                await asyncio.to_thread(_start_server, args, paths)
                sock = _attach(paths)
        finally:
            lock.release()
    if sock is None:
        raise ConfigError(f"the shared source did not answer on {paths.socket}: see {paths.log}")
    try:
        # Blocking, in a thread: the reply lines are read exactly (no byte of the connection
        # is taken with them), so the socket can then go to splice or to asyncio as it is.
        sock.settimeout(args.wait + START_TIMEOUT)
        reply = await asyncio.to_thread(_exchange, sock, request, paths, say)
    except BaseException:
        sock.close()
        raise
    if reply.error is not None:
        sock.close()
        say(reply.error)
        return reply.code
    await _relay(sock)
    return await _why_ended(paths, started)


async def _relay(sock: socket.socket) -> None:
    from localproxy.connect.splice import can_splice, splice_stdio

    if can_splice():
        from localproxy.local.stdio_ends import grow_pipe

        for fd in (0, 1):  # relay_stdio grows the pipes it watches; splicing watches none
            grow_pipe(fd)
        await splice_stdio(sock)
        return
    from localproxy.local.stdio import relay_stdio

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    await relay_stdio(reader, writer)


def _attach(paths: SharedPaths) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None  # none yet, or a stale socket of a server that died


def _exchange(sock: socket.socket, request: Request, paths: SharedPaths, progress: Callable[[str], None]) -> Reply:
    """Send ``request``; pass progress lines on; -> the final reply (ok or error)."""
    sock.sendall(request.encode())
    while True:
        line = _recv_line(sock)
        if not line:
            raise ConfigError(f"the shared source ended before answering: see {paths.log}")
        try:
            reply = Reply.decode(line)
        except ValueError:
            raise ConfigError(f"the shared source answered garbage: see {paths.log}") from None
        if reply.say is None:
            return reply
        progress(reply.say)


def _recv_line(sock: socket.socket) -> bytes:
    """One line, and not a byte more (MSG_PEEK finds its end first)."""
    data = b""
    while len(data) <= MAX_LINE:
        peek = sock.recv(MAX_LINE, socket.MSG_PEEK)
        if not peek:
            return data
        end = peek.find(b"\n")
        data += sock.recv(end + 1 if end >= 0 else len(peek))
        if end >= 0:
            return data
    raise ConfigError("the shared source sent a line that is too long")


class _StartLock:
    """An exclusive lock file guarding the shared server's start (bounded wait: LOCK_TIMEOUT)."""

    def __init__(self, paths: SharedPaths) -> None:
        self.path = paths.lock
        self.fd = -1

    def acquire(self) -> None:  # blocking: called in a worker thread
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ConfigError(f"another localproxy connect holds {self.path} for too long") from None
                time.sleep(0.05)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1


def _start_server(args: argparse.Namespace, paths: SharedPaths) -> None:
    """Start the shared server, detached (its own session), and wait until it listens."""
    command = [sys.executable, "-m", "localproxy.connect", "--serve", args.thing, args.service,
               "--tunnel-minutes", str(args.tunnel_minutes), "--idle-exit", str(args.idle_exit),
               "-v", str(args.verbose)]  # fmt: skip
    if args.region:
        command += ["-r", args.region]
    if args.proxy_endpoint:
        command += ["-e", args.proxy_endpoint]
    log = open(paths.log, "ab")
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        log.close()
    assert process.stdout is not None
    line = _read_line(process.stdout, START_TIMEOUT)
    process.stdout.close()
    process.returncode = 0  # detached on purpose: no "still running" warning when we exit
    try:
        reply = Reply.decode(line)
    except ValueError:
        raise ConfigError(f"the shared source did not start: see {paths.log}") from None
    if reply.error is not None:
        raise _Failed(reply.error, reply.code)


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a pipe, waiting at most ``timeout`` (select: the pipe may stay silent)."""
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline(MAX_LINE) if ready else b""


class _Failed(LocalProxyError):
    """An error the shared server reported, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


async def _why_ended(paths: SharedPaths, started: float) -> int:
    """Ask the shared source why our connection ended: 0 for a normal end, else the error's code."""
    sock = _attach(paths)
    if sock is not None:
        try:
            sock.settimeout(WHY_WAIT)
            reply = await asyncio.to_thread(_exchange, sock, Request("", 0, why=True), paths, say)
        except (OSError, LocalProxyError):
            reply = Reply()  # it went away meanwhile: see its status file below
        finally:
            sock.close()
        if reply.error is not None:
            say(f"connection ended: {reply.error}")
            return reply.code
        if reply.ok:
            return ExitCode.OK
    # The source has stopped: it wrote why first.
    try:
        status = json.loads(paths.status.read_text(encoding="utf-8"))
        if float(status["time"]) >= started:
            say(f"connection ended: {status['message']}")
            return int(status["code"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ExitCode.OK


async def _connect_here(args: argparse.Namespace, request: Request) -> int:
    """--no-share, or no Unix sockets (Windows): a source of our own, in this process, for this
    one connection (the stdlib event loop and relay_stdio's thread fallback work everywhere)."""
    from localproxy.connect.server import WHY_TIMEOUT
    from localproxy.connect.source import SourceOptions, ThingSource
    from localproxy.local.stdio import relay_stdio
    from localproxy.ops.logs import setup_logging

    setup_logging(args.verbose if args.verbose != DEFAULT_VERBOSITY else 3, sys.stderr)  # warnings, unless asked
    api_url = os.environ.get("AWS_ENDPOINT_URL")
    source = ThingSource(SourceOptions(args.thing, args.region, args.proxy_endpoint, api_url, args.tunnel_minutes))
    try:
        reader, writer = await source.open_connection(request.service, request.wait, say)
        await relay_stdio(reader, writer)  # it grows the pipes it watches (stdio_ends.grow_pipe)
        error = await source.why_dropped(WHY_TIMEOUT)
    finally:
        await source.close(close_tunnel=args.close_on_exit)
    if error is not None:
        say(f"connection ended: {error}")
        return error.exit_code
    return ExitCode.OK
