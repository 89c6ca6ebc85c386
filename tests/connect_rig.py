"""Real parts for ``localproxy connect`` tests and its benchmark: an asyncssh server behind
our device agent (its token from the emulator's MQTT notify), and ``connect`` as a child
process whose stdin/stdout carry an asyncssh client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from localproxy.agent import DeviceAgent, MqttConnected, MqttSettings
from localproxy.emulator import Emulator
from localproxy.settings import Settings
from localproxy.types import DestinationTarget

TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parent.parent
FAST = Settings(retry_delay_ms=100, tcp_connection_retry_delay_ms=100, tcp_connection_retry_count=2)


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # loopback test server: no authentication


async def _serve_process(process: Any) -> None:
    """Commands: ``echo TEXT``; ``cat`` (echo every byte); ``sink N`` (read N bytes, say ok)."""
    command = process.command or ""
    try:
        if command.startswith("echo "):
            process.stdout.write(command[5:].encode() + b"\n")
        elif command == "cat":
            while data := await process.stdin.read(256 * 1024):
                process.stdout.write(data)
                await process.stdout.drain()
        elif command.startswith("sink "):
            left = int(command[5:])
            while left > 0 and (data := await process.stdin.read(min(left, 256 * 1024))):
                left -= len(data)
            process.stdout.write(b"ok\n")
        process.exit(0)
    except (asyncssh.Error, ConnectionError, asyncio.IncompleteReadError):
        process.close()


@contextlib.asynccontextmanager
async def ssh_server() -> AsyncIterator[int]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        _NoAuth, "127.0.0.1", 0, server_host_keys=[key], process_factory=_serve_process, encoding=None
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Device:
    emu: Emulator
    thing: str
    ssh_port: int
    services: dict[str, DestinationTarget] = field(default_factory=dict)  # what the agent serves

    def __post_init__(self) -> None:
        self.services = self.services or {"SSH": DestinationTarget("127.0.0.1", self.ssh_port)}

    @contextlib.asynccontextmanager
    async def agent(self) -> AsyncIterator[DeviceAgent]:
        """Our device agent serving the SSH server as SSH, subscribed to the notify topic."""
        assert self.emu.mqtt_url is not None
        mqtt = MqttSettings.parse(self.emu.mqtt_url, retry_delay_ms=50, max_retry_delay_ms=200)
        subscribed = asyncio.Event()
        agent = DeviceAgent(
            self.thing, mqtt, self.services,
            endpoint=self.emu.data_url, proxy_settings=FAST,
        )  # fmt: skip
        agent.subscribe(lambda event: isinstance(event, MqttConnected) and subscribed.set())
        async with agent:
            await asyncio.wait_for(subscribed.wait(), TIMEOUT)
            yield agent


@contextlib.asynccontextmanager
async def device(thing: str = "device-42", agent: bool = True, ssh_port: int | None = None) -> AsyncIterator[Device]:
    """The emulator (with MQTT), an SSH server (asyncssh, or the one on ``ssh_port``) and,
    with ``agent``, our agent serving it as SSH."""
    async with contextlib.AsyncExitStack() as stack:
        emu = await stack.enter_async_context(Emulator(port=0, mqtt=True))
        port = ssh_port if ssh_port is not None else await stack.enter_async_context(ssh_server())
        dev = Device(emu, thing, port)
        if not agent:
            yield dev
            return
        async with dev.agent():
            yield dev


@dataclass
class Run:
    """One finished ``connect``: exit code and stderr."""

    code: int
    stderr: str


@dataclass
class ConnectRig:
    """Runs ``python -m localproxy.connect`` against ``dev.emu``, in a private runtime dir."""

    dev: Device
    runtime: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lpc-")))

    seen: set[int] = field(default_factory=set)  # every shared server pid ever seen
    last_process: Any = None  # the last ``ssh()``'s connect child

    def __post_init__(self) -> None:
        os.chmod(self.runtime, 0o700)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS", "AWSIOT_TUNNEL_"))}
        env.update(
            AWS_ENDPOINT_URL=self.dev.emu.api_url, AWS_DEFAULT_REGION=self.dev.emu.region,
            AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", LOCALPROXY_RUNTIME_DIR=str(self.runtime),
            PYTHONPATH=str(ROOT),
        )  # fmt: skip
        return env

    def command(self, *extra: str, thing: str | None = None, service: str = "SSH") -> list[str]:
        return [sys.executable, "-m", "localproxy.connect", thing or self.dev.thing, service,
                "-e", self.dev.emu.data_url, *extra]  # fmt: skip

    async def run(self, *extra: str, stdin: bytes = b"", thing: str | None = None, timeout: float = TIMEOUT) -> Run:
        """A ``connect`` whose stdin is ``stdin`` then EOF; its stdout is discarded."""
        process = await asyncio.create_subprocess_exec(
            *self.command(*extra, thing=thing), env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(process.communicate(stdin), timeout)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return Run(int(process.returncode or 0), err.decode(errors="replace"))

    @contextlib.asynccontextmanager
    async def ssh(self, *extra: str) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, list[bytes]]]:
        """An asyncssh client whose transport is a ``connect`` child's stdin/stdout (pipes).

        Yields the connection and the child's stderr lines (collected as they come).
        """
        process = await asyncio.create_subprocess_exec(
            *self.command(*extra), env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.last_process = process
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=theirs)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        err: list[bytes] = []
        pumps = [
            asyncio.ensure_future(_pump(reader, process.stdin)),
            asyncio.ensure_future(_pump(process.stdout, writer)),
            asyncio.ensure_future(_collect(process.stderr, err)),
        ]
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect("device", sock=ours, username="op", known_hosts=None, agent_path=None,
                                 client_keys=None, password=None, encoding=None),
                TIMEOUT,
            )  # fmt: skip
        except BaseException:
            process.kill()
            await process.wait()
            for pump in pumps:
                pump.cancel()
            raise AssertionError("ssh over connect failed:\n" + b"".join(err).decode(errors="replace")) from None
        self.server_pids()  # remember the shared server, to check it exits
        try:
            yield conn, err
        finally:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
            try:
                await asyncio.wait_for(process.wait(), TIMEOUT)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                for pump in pumps:
                    pump.cancel()
                writer.close()

    def server_pids(self) -> list[int]:
        """Shared servers running now (their pid files)."""
        pids = []
        for path in self.runtime.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(path.read_text()))
        self.seen.update(pids)
        return pids

    async def wait_servers_gone(self, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while any(alive(pid) for pid in {*self.server_pids(), *self.seen}):
                await asyncio.sleep(0.05)  # polling a process table: there is no event to wait on

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.runtime.glob("*.log"))

    async def cleanup(self) -> list[int]:
        """Kill any shared server still running; -> the pids that were still alive."""
        alive_pids = [pid for pid in {*self.server_pids(), *self.seen} if alive(pid)]
        for pid in alive_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)
        return alive_pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would count as alive; the servers are not our children (detached).
    return True


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _collect(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def tunnel_count(emu: Emulator, thing: str, status: str | None = None) -> int:
    """Tunnels of ``thing`` the control API lists (via boto3), optionally of one status."""
    from localproxy.testing.aws import api_for, call

    answer = await call(api_for(emu).list_tunnels, thingName=thing)
    return sum(1 for t in answer["tunnelSummaries"] if status is None or t["status"] == status)
