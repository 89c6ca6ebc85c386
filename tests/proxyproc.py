"""A ``python -m localproxy`` child process for tests, its output collected line by line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 15
LISTENING = re.compile(r"Listening for new connection on port (\d+)")


class ProxyProcess:
    """A ``python -m localproxy`` child whose output (stdout and stderr) is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._collect())

    @classmethod
    async def start(
        cls, *args: str, token: str, extra_env: dict[str, str] | None = None, module: str = "localproxy"
    ) -> "ProxyProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        env.update(PYTHONPATH=str(ROOT), AWSIOT_TUNNEL_ACCESS_TOKEN=token)
        env.update(extra_env or {})
        env.pop("HTTPS_PROXY", None)
        env.pop("https_proxy", None)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=str(ROOT),
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

    async def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        async def scan() -> re.Match[str]:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"process ended without {pattern.pattern!r}:\n" + self.text)
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(scan(), TIMEOUT)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await self.wait()

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.process.wait(), TIMEOUT)
        await asyncio.wait_for(self._reader, TIMEOUT)
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
