"""``localproxy connect`` vs the manual four-step flow vs a direct connection (issue 19).

    python benchmarks/bench_connect.py [--short] [--runs N] [--mib N]

Everything on loopback, real parts: the emulator (control API through boto3, MQTT notify),
our device agent in front of an asyncssh server (and of raw SINK/ECHO apps), ``connect`` as
a child process whose stdin/stdout carry an asyncssh client (pipes, as OpenSSH gives a
ProxyCommand). Prints, per way of reaching the device, the median time from start to the
remote command's output, then bulk bytes/s and echo p50 over ``connect``'s stdio vs over a
TCP source port (``localproxy -s``), with the issue's goals:

- repeat connect (tunnel open, shared source running) adds <= 300 ms over direct;
- first connect (opens the tunnel, the device connects) <= 3 s;
- stdio throughput >= 80% of the TCP source's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import asyncssh  # noqa: E402
from connect_rig import ConnectRig, Device, device  # noqa: E402

from localproxy.testing.aws import api_for, call  # noqa: E402
from localproxy.testing.processes import LISTENING, ProxyProcess  # noqa: E402
from localproxy.types import DestinationTarget  # noqa: E402

TIMEOUT = 30.0
HEADER = struct.Struct("!Q")


async def ssh_echo(conn: asyncssh.SSHClientConnection) -> None:
    result = await conn.run("echo hi", check=True)
    assert result.stdout in (b"hi\n", "hi\n"), result.stdout


async def direct(dev: Device) -> float:
    start = time.perf_counter()
    conn = await asyncssh.connect("127.0.0.1", dev.ssh_port, username="op", known_hosts=None,
                                  agent_path=None, client_keys=None, password=None, encoding=None)  # fmt: skip
    async with conn:
        await ssh_echo(conn)
        return time.perf_counter() - start


async def through_connect(rig: ConnectRig) -> float:
    start = time.perf_counter()
    async with rig.ssh() as (conn, _):
        await ssh_echo(conn)
        return time.perf_counter() - start


async def close_all(dev: Device) -> None:
    api = api_for(dev.emu)
    listed = await call(api.list_tunnels, thingName=dev.thing)
    for summary in listed["tunnelSummaries"]:
        if summary["status"] == "OPEN":
            await call(api.close_tunnel, tunnelId=summary["tunnelId"])


async def first_connect(rig: ConnectRig) -> float:
    await rig.cleanup()  # no shared source...
    rig.runtime.mkdir(mode=0o700)
    await close_all(rig.dev)  # ...and no open tunnel: this connect opens one, the device connects
    return await through_connect(rig)


async def source_proxy(dev: Device, token: str, services: str) -> tuple[ProxyProcess, list[int]]:
    proxy = await ProxyProcess.start("-s", services, "-e", dev.emu.data_url,
                                     token=token, cwd=str(ROOT))  # fmt: skip
    count = services.count("=") or 1
    ports = [int(m.group(1)) for m in await proxy.wait_for_lines(LISTENING, count, TIMEOUT)]
    return proxy, ports


async def manual(dev: Device) -> float:
    """open-tunnel, the device picks up its token, ``localproxy -s 0``, ssh to the port."""
    await close_all(dev)
    api = api_for(dev.emu)
    start = time.perf_counter()
    opened = await call(api.open_tunnel, destinationConfig={"thingName": dev.thing, "services": ["SSH"]})
    await dev.emu.wait_connected(opened["tunnelId"], "destination", timeout=TIMEOUT)
    proxy, (port,) = await source_proxy(dev, opened["sourceAccessToken"], "0")
    try:
        conn = await asyncssh.connect("127.0.0.1", port, username="op", known_hosts=None,
                                      agent_path=None, client_keys=None, password=None, encoding=None)  # fmt: skip
        async with conn:
            await ssh_echo(conn)
            return time.perf_counter() - start
    finally:
        await proxy.stop()


# --- raw streams: bulk to a sink, ping-pong with an echo ---------------------------------------


async def sink_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        writer.write(b"go")  # the path is up: the client's clock starts now (not at process start)
        await writer.drain()
        while size > 0 and (data := await reader.read(min(size, 1 << 20))):
            size -= len(data)
        writer.write(b"ok")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def echo_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


Stream = tuple[Callable[[bytes], Awaitable[None]], Callable[[int], Awaitable[bytes]], Callable[[], Awaitable[None]]]


async def bulk(stream: Stream, mib: int) -> float:
    send, receive, close = stream
    chunk = os.urandom(1 << 20)
    await send(HEADER.pack(mib << 20))
    # Bytes/s of an established connection: a connect or --stdio child's start-up
    # and attach are timed by the latency part, not counted here.
    assert await receive(2) == b"go"
    start = time.perf_counter()
    for _ in range(mib):
        await send(chunk)
    assert await receive(2) == b"ok"
    elapsed = time.perf_counter() - start
    await close()
    return (mib << 20) / elapsed


async def echo_p50(stream: Stream, count: int) -> float:
    send, receive, close = stream
    message, times = b"x" * 64, []
    for _ in range(count):
        start = time.perf_counter()
        await send(message)
        assert await receive(len(message)) == message
        times.append(time.perf_counter() - start)
    await close()
    return statistics.median(times)


async def tcp_stream(port: int) -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def close() -> None:
        writer.close()

    return send, lambda n: asyncio.wait_for(reader.readexactly(n), TIMEOUT), close


async def stdio_stream(rig: ConnectRig, service: str) -> Stream:
    return await process_stream(rig.command(service=service), rig.env)


async def process_stream(command: list[str], env: dict[str, str]) -> Stream:
    """A child whose stdin/stdout carry the connection."""
    process = await asyncio.create_subprocess_exec(
        *command, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, limit=1 << 20,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    async def send(data: bytes) -> None:
        stdin.write(data)
        await stdin.drain()

    async def close() -> None:
        stdin.close()
        await asyncio.wait_for(process.wait(), TIMEOUT)

    return send, lambda n: asyncio.wait_for(stdout.readexactly(n), TIMEOUT), close


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def run(runs: int, mib: int, echoes: int, parts: str = "all") -> dict[str, Any]:
    results: dict[str, Any] = {}
    if parts in ("all", "latency"):
        await latency(results, runs)
    if parts in ("all", "throughput"):
        await throughput(results, runs, mib, echoes)
    return results


async def latency(results: dict[str, Any], runs: int) -> None:
    async with device("bench-ssh") as dev:
        rig = ConnectRig(dev)
        try:
            await direct(dev)  # warm the imports and the server's key exchange
            results["direct"] = median_ms([await direct(dev) for _ in range(runs)])
            results["manual"] = median_ms([await manual(dev) for _ in range(runs)])
            results["first"] = median_ms([await first_connect(rig) for _ in range(runs)])
            await through_connect(rig)
            results["repeat"] = median_ms([await through_connect(rig) for _ in range(runs)])
        finally:
            await rig.cleanup()


async def throughput(results: dict[str, Any], runs: int, mib: int, echoes: int) -> None:
    sink = await asyncio.start_server(sink_app, "127.0.0.1", 0)
    echo = await asyncio.start_server(echo_app, "127.0.0.1", 0)
    async with sink, echo, device("bench-raw", agent=False) as dev:
        dev.services = {
            "SINK": DestinationTarget("127.0.0.1", sink.sockets[0].getsockname()[1]),
            "ECHO": DestinationTarget("127.0.0.1", echo.sockets[0].getsockname()[1]),
        }
        async with dev.agent():
            api = api_for(dev.emu)
            opened = await call(api.open_tunnel, destinationConfig={"thingName": dev.thing, "services": ["SINK", "ECHO"]})
            await dev.emu.wait_connected(opened["tunnelId"], "destination", timeout=TIMEOUT)
            # TCP source first; then connect takes the same tunnel over (its source is gone by then).
            proxy, (sink_port, echo_port) = await source_proxy(dev, opened["sourceAccessToken"], "SINK=0,ECHO=0")
            try:
                results["tcp_bytes"] = statistics.median([await bulk(await tcp_stream(sink_port), mib) for _ in range(runs)])
                results["tcp_echo"] = await echo_p50(await tcp_stream(echo_port), echoes) * 1e6
            finally:
                await proxy.stop()
            await dev.emu.wait_disconnected(opened["tunnelId"], "source", timeout=TIMEOUT)
            tunnel_id = opened["tunnelId"]

            async def plain_stdio(service: str) -> Stream:
                """``localproxy --stdio SERVICE`` with a fresh source token: one proxy, no sharing."""
                await dev.emu.wait_disconnected(tunnel_id, "source", timeout=TIMEOUT)
                rotated = await call(api.rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="SOURCE")
                env = {**os.environ, "AWSIOT_TUNNEL_ACCESS_TOKEN": rotated["sourceAccessToken"]}
                return await process_stream([sys.executable, "-m", "localproxy", "--stdio", service,
                                             "-e", dev.emu.data_url, "-v", "1"], env)  # fmt: skip

            results["plain_bytes"] = statistics.median([await bulk(await plain_stdio("SINK"), mib) for _ in range(runs)])
            results["plain_echo"] = await echo_p50(await plain_stdio("ECHO"), echoes) * 1e6
            await dev.emu.wait_disconnected(tunnel_id, "source", timeout=TIMEOUT)
            rig = ConnectRig(dev)
            try:
                await echo_p50(await stdio_stream(rig, "ECHO"), 10)  # starts the shared source
                results["stdio_bytes"] = statistics.median(
                    [await bulk(await stdio_stream(rig, "SINK"), mib) for _ in range(runs)]
                )
                results["stdio_echo"] = await echo_p50(await stdio_stream(rig, "ECHO"), echoes) * 1e6
            finally:
                await rig.cleanup()


def report(r: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    if "direct" in r:
        latency_report(r)
    if "tcp_bytes" in r:
        throughput_report(r)


def latency_report(r: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print("\nTime from start to the remote command's output (asyncssh 'echo hi'), median ms")
    print(f"  direct to the SSH server              {r['direct']:8.1f}")
    print(f"  manual four-step flow                 {r['manual']:8.1f}   ({r['manual'] / r['direct']:.1f}x direct)")
    print(f"  connect, first (opens the tunnel)     {r['first']:8.1f}   goal <= 3000 ms: {verdict(r['first'] <= 3000)}")
    print(f"  connect, repeat (reuses it)           {r['repeat']:8.1f}   +{r['repeat'] - r['direct']:.1f} ms over direct, "
          f"goal <= 300: {verdict(r['repeat'] - r['direct'] <= 300)}")  # fmt: skip


def throughput_report(r: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    ratio = r["stdio_bytes"] / r["tcp_bytes"]
    print("\nThrough the tunnel        TCP source (-s)   --stdio   connect stdio   connect/TCP")
    print(f"  bulk, MB/s              {r['tcp_bytes'] / 1e6:15.1f}   {r['plain_bytes'] / 1e6:7.1f}   "
          f"{r['stdio_bytes'] / 1e6:13.1f}   {ratio:11.2f}  goal >= 0.80: {verdict(ratio >= 0.8)}")  # fmt: skip
    print(f"  echo p50 (64 B), us     {r['tcp_echo']:15.0f}   {r['plain_echo']:7.0f}   "
          f"{r['stdio_echo']:13.0f}   {r['stdio_echo'] / r['tcp_echo']:10.2f}x")  # fmt: skip


def main() -> None:
    import logging

    logging.getLogger("localproxy").setLevel(logging.CRITICAL)  # the agent's and emulator's chatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a quick check: 2 runs, 16 MiB, 200 echoes")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--parts", choices=("all", "latency", "throughput"), default="all")
    args = parser.parse_args()
    if args.short:
        args.runs, args.mib, args.echoes = 2, 16, 200
    report(asyncio.run(run(args.runs, args.mib, args.echoes, args.parts)))


if __name__ == "__main__":
    main()
