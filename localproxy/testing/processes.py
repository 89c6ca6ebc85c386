"""Real processes for tests: a ``python -m localproxy`` child whose output is collected, an echo app."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

TIMEOUT = 15
LISTENING = re.compile(r"Listening for new connection on port (\d+)")


class ProxyProcess:
    """A ``python -m localproxy`` child whose output (stdout and stderr) is collected line by line."""

    # Defaults of ``start``'s ``cwd`` and ``pythonpath`` (a subclass may set them).
    default_cwd: str | None = None
    default_pythonpath: str | None = None

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._collect())

    @classmethod
    async def start(
        cls,
        *args: str,
        token: str | None = None,
        extra_env: dict[str, str] | None = None,
        module: str = "localproxy",
        cwd: str | None = None,
        pythonpath: str | None = None,
    ) -> "ProxyProcess":
        """Start ``python -m module args``; ``token`` goes in AWSIOT_TUNNEL_ACCESS_TOKEN.

        The caller's AWSIOT_TUNNEL_* and HTTPS_PROXY variables are not passed on: a
        region or token of the developer's shell must not change what a test runs.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        env.pop("HTTPS_PROXY", None)
        env.pop("https_proxy", None)
        pythonpath = pythonpath or cls.default_pythonpath
        if pythonpath is not None:
            env.update(PYTHONPATH=pythonpath)
        if token is not None:
            env.update(AWSIOT_TUNNEL_ACCESS_TOKEN=token)
        env.update(extra_env or {})
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=cwd or cls.default_cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _collect(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        """The first line (seen so far or to come) matching ``pattern``."""
        return (await self.wait_for_lines(pattern, 1, timeout))[0]

    async def wait_for_lines(
        self, pattern: str | re.Pattern[str], count: int, timeout: float = TIMEOUT
    ) -> list[re.Match[str]]:
        """The first ``count`` lines matching ``pattern``, in order."""
        compiled = re.compile(pattern)

        async def scan() -> list[re.Match[str]]:
            found: list[re.Match[str]] = []
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := compiled.search(line):
                        found.append(match)
                        if len(found) == count:
                            return found
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"process ended without {compiled.pattern!r}:\n" + self.text)
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), timeout)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await self.wait(timeout)

    async def wait(self, timeout: float = TIMEOUT) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return int(code)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An ``asyncio.start_server`` handler that echoes until EOF (a reset peer just ends it)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_app() -> tuple[asyncio.Server, int]:
    """A TCP echo server on 127.0.0.1 (a destination app); returns it and its port."""
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]
