"""Hostile-service floods against a proxy process: RSS growth, log lines, still serving (issue 22).

Run: ``python benchmarks/bench_floods.py [--seconds 10] [--against /work/main] [--only NAME]``.

For each flood a fresh ``python -m localproxy`` process (``-v 4``, the default)
connects over plain ``ws://`` to a hostile service run here
(:mod:`localproxy.testing.hostile`), which then, for ``--seconds``:

- ``ping``: stops reading and sends pings (125-byte payload) as fast as the proxy reads them;
- ``unknown-data``: stops reading and sends DATA for streams that never started, a new
  stream id per frame (500 frames per websocket message);
- ``conn-start``: starts a stream, then sends CONNECTION_START for ever new connection
  ids (the proxy's ``tcp.max_active_connections``: 128) and does not read;
- ``service-ids``: a source proxy configured with ``-s SSH=0``; SERVICE_IDS names 2,000
  services (``SSH`` and 1,999 others), sent again every 0.5 s.

A flood that makes the proxy end its session goes on in the session it reconnects
with. Printed per flood: RSS before, after and its peak (VmHWM) in MiB, the
proxy's log lines and bytes during the flood, websocket sessions it opened,
listening sockets it has (``service-ids``), the longest log line (log counts:
during the flood and 1 s after it, when the floods' sessions are dropped), and whether a
normal connection is served afterwards (echoed through the tunnel). With
``--against DIR`` the same floods run against the proxy in DIR (e.g. a checkout
of main) and the columns are printed side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localproxy.testing.hostile import HostileService, Session, ping_frames  # noqa: E402
from localproxy.testing.processes import echo_app  # noqa: E402
from localproxy.wire.codec import Message, MessageType  # noqa: E402

T = MessageType
TOKEN = "AQGAAFloodBenchToken0000"
MANY_IDS = ("SSH", *(f"S{i}" for i in range(1999)))


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def listening_sockets(pid: int) -> int:
    """TCP sockets of ``pid`` in LISTEN state (from /proc/net/tcp{,6} inodes)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == "0A":
                        inodes.add(fields[9])
        except OSError:
            continue
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    except OSError:
        pass
    return count


@dataclass
class Proxy:
    process: asyncio.subprocess.Process
    lines: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes) per log line
    longest: int = 0
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @classmethod
    async def start(cls, pythonpath: str, *args: str) -> "Proxy":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        env.update(PYTHONPATH=pythonpath, AWSIOT_TUNNEL_ACCESS_TOKEN=TOKEN)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "localproxy", *args, cwd=pythonpath, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            limit=1 << 24,
        )
        proxy = cls(process)
        asyncio.get_running_loop().create_task(proxy._read())
        return proxy

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            self.lines.append((time.monotonic(), len(raw)))
            self.longest = max(self.longest, len(raw))
            if not self.port and b"Listening for new connection on port" in raw:
                self.port = int(raw.rsplit(b" ", 1)[1])
                self.listening.set()

    def log_between(self, start: float, end: float) -> tuple[int, int]:
        chosen = [size for at, size in self.lines if start <= at <= end]
        return len(chosen), sum(chosen)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()


async def latest_session(service: HostileService, known: Session | None, timeout: float = 15) -> Session:
    """The newest open session (waiting for the proxy to reconnect if the last one ended)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        live = [s for s in service.sessions if not s.closed.is_set() and not s.transport.is_closing()]
        if live:
            return live[-1]
        await asyncio.sleep(0.02)
    raise TimeoutError("the proxy did not reconnect")


async def flood_loop(service: HostileService, seconds: float,
                     one: Callable[[Session, float], Awaitable[None]]) -> None:
    """Run ``one(session, until)`` on the current session until ``seconds`` passed (across reconnects)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    for _ in range(10_000):  # bounded: each turn ends with its session or the time
        if loop.time() >= until:
            return
        try:
            session = await latest_session(service, None, timeout=max(0.1, until - loop.time()))
        except TimeoutError:
            return
        session.stop_reading()
        await one(session, until)


async def ping_flood(session: Session, until: float) -> None:
    burst = ping_frames(500)
    await session.flood(burst, seconds=until - asyncio.get_running_loop().time(), max_count=10**9)


async def unknown_data_flood(session: Session, until: float) -> None:
    loop = asyncio.get_running_loop()
    stream = 1
    while loop.time() < until and not session.transport.is_closing():
        message = session.frames_message(
            Message(T.DATA, stream + i, payload=b"x" * 16, service_id="SSH", connection_id=1) for i in range(500)
        )
        stream += 500
        await session.flood(message, seconds=until - loop.time(), max_count=1)


_STREAM_IDS = itertools.count(1_000_000)


async def conn_start_flood(session: Session, until: float) -> None:
    loop = asyncio.get_running_loop()
    stream_id = next(_STREAM_IDS)  # a new stream per session
    session.write_raw(session.frames_message([Message(T.STREAM_START, stream_id, service_id="SSH", connection_id=1)]))
    connection = 2
    while loop.time() < until and not session.transport.is_closing():
        message = session.frames_message(
            Message(T.CONNECTION_START, stream_id, service_id="SSH", connection_id=connection + i) for i in range(500)
        )
        connection += 500
        await session.flood(message, seconds=until - loop.time(), max_count=1)


async def service_ids_flood(session: Session, until: float) -> None:
    loop = asyncio.get_running_loop()
    message = session.frames_message([Message(T.SERVICE_IDS, available_service_ids=MANY_IDS)])
    while loop.time() < until and not session.transport.is_closing():
        session.write_raw(message)
        await asyncio.sleep(0.5)


FLOODS: dict[str, Callable[[Session, float], Awaitable[None]]] = {
    "ping": ping_flood,
    "unknown-data": unknown_data_flood,
    "conn-start": conn_start_flood,
    "service-ids": service_ids_flood,
}


async def serves_destination(service: HostileService) -> bool:
    """A normal connection through the tunnel: STREAM_START + DATA, echoed back by the app."""
    for attempt in range(3):  # the flood's own backlog may still end the session it is in
        try:
            session = await latest_session(service, None)
        except TimeoutError:
            return False
        session.transport.resume_reading()
        stream_id = 9_000_000 + attempt
        try:
            await session.send(Message(T.STREAM_START, stream_id, service_id="SSH", connection_id=1))
            await session.send(Message(T.DATA, stream_id, payload=b"hello", service_id="SSH", connection_id=1))
        except Exception:  # noqa: BLE001 - that session ended: try the next one
            continue
        if await _received(session, stream_id, b"hello"):
            return True
    return False


async def serves_source(service: HostileService, proxy: Proxy) -> bool:
    """A normal local client on the source's port: its bytes reach the service as DATA."""
    try:
        await asyncio.wait_for(proxy.listening.wait(), 10)
        session = await latest_session(service, None)
        session.transport.resume_reading()
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 10)
    except (OSError, TimeoutError, asyncio.TimeoutError):
        return False
    writer.write(b"hello")
    await writer.drain()
    ok = await _received(session, None, b"hello")
    writer.close()
    return ok


async def _received(session: Session, stream_id: int | None, payload: bytes) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while loop.time() < end and not session.closed.is_set():
        for message in session.received:
            if message.type == T.DATA and bytes(message.payload) == payload and stream_id in (None, message.stream_id):
                return True
        await asyncio.sleep(0.02)
    return False


async def run_flood(name: str, pythonpath: str, seconds: float) -> dict[str, Any]:
    app, app_port = await echo_app()
    source = name == "service-ids"
    async with HostileService(("SSH",)) as service:
        if source:
            args = ["-e", service.url, "-s", "SSH=0", "-b", "127.0.0.1"]
        else:
            args = ["-e", service.url, "-d", f"SSH=127.0.0.1:{app_port}"]
        proxy = await Proxy.start(pythonpath, *args, "--settings-json", _settings_file())
        try:
            await service.next_session(15)
            if source:
                await asyncio.wait_for(proxy.listening.wait(), 10)
            await asyncio.sleep(0.5)  # settle: the RSS before is the idle proxy's
            pid = proxy.process.pid
            before = rss_kib(pid)
            start = time.monotonic()
            await flood_loop(service, seconds, FLOODS[name])
            after = rss_kib(pid)
            peak = rss_kib(pid, "VmHWM")
            listening = listening_sockets(pid)  # (before the reconnect below: a new SERVICE_IDS)
            for session in service.sessions:  # the flood ends: no more peer frames
                session.transport.abort()
            await asyncio.sleep(1.0)  # the proxy's last lines reach our reader (it lagged behind the flood)
            lines, size = proxy.log_between(start, time.monotonic())
            served = await (serves_source(service, proxy) if source else serves_destination(service))
            alive = proxy.process.returncode is None
            return {
                "rss_before": before / 1024, "rss_after": after / 1024, "rss_peak": peak / 1024,
                "lines": lines, "log_bytes": size, "sessions": len(service.sessions),
                "listening": listening, "longest": proxy.longest, "served": served and alive,
                "exit": proxy.process.returncode,
            }
        finally:
            await proxy.stop()
            app.close()


_SETTINGS: str | None = None


def _settings_file() -> str:
    """Fast reconnects (as a flood's reconnect would otherwise wait 2.5 s)."""
    global _SETTINGS
    if _SETTINGS is None:
        import json
        import tempfile

        handle, path = tempfile.mkstemp(suffix=".json", prefix="bench_floods_")
        with os.fdopen(handle, "w") as out:
            json.dump({"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "100"}}}}, out)
        _SETTINGS = path
    return _SETTINGS


ROWS = [
    ("RSS before (MiB)", "rss_before", "{:.1f}"),
    ("RSS after (MiB)", "rss_after", "{:.1f}"),
    ("RSS peak (MiB)", "rss_peak", "{:.1f}"),
    ("log lines", "lines", "{:,}"),
    ("log bytes", "log_bytes", "{:,}"),
    ("longest line (bytes)", "longest", "{:,}"),
    ("ws sessions", "sessions", "{:,}"),
    ("listening sockets", "listening", "{:,}"),
    ("serves afterwards", "served", "{}"),
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each flood (default 10)")
    parser.add_argument("--against", help="also run the proxy of this checkout (e.g. /work/main), side by side")
    parser.add_argument("--only", choices=sorted(FLOODS), action="append", help="run only these floods")
    args = parser.parse_args()
    targets = [("this tree", str(ROOT))]
    if args.against:
        targets.append((Path(args.against).name or args.against, str(Path(args.against).resolve())))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.seconds:g} s per flood")
    try:
        for name in args.only or list(FLOODS):
            results = []
            for label, path in targets:
                results.append((label, await run_flood(name, path, args.seconds)))
            print(f"\n{name}")
            print(f"  {'':24}" + "".join(f"{label:>16}" for label, _ in results))
            for title, key, fmt in ROWS:
                print(f"  {title:24}" + "".join(f"{fmt.format(r[key]):>16}" for _, r in results))
            growth = [r["rss_peak"] - r["rss_before"] for _, r in results]
            print(f"  {'RSS growth, peak (MiB)':24}" + "".join(f"{g:>16.1f}" for g in growth))
    finally:
        if _SETTINGS is not None:
            os.unlink(_SETTINGS)


if __name__ == "__main__":
    asyncio.run(main())
