"""Soak: a tunnel carrying mixed traffic for ``--minutes``, its link cut every ``--cut-every`` s.

Run: ``python benchmarks/bench_soak.py [--minutes 30] [--cut-every 180] [--sample 30]``.

Everything runs in this process (so asyncio tasks can be counted): the emulator,
an impairment forwarder (``tests/impair.py``) that both proxies' websockets cross,
a source and a destination ``LocalProxy``, an echo app, and the clients:

- interactive: long connections, a 200-byte round trip every 100 ms;
- bulk: connections echoing ``--bulk-mib`` MiB each;
- churn: connect, 1 KiB round trip, close, over and over.

Every ``--cut-every`` seconds the forwarder aborts both websockets (RST). A
connection "was cut" if its life overlapped a disruption (from the cut until both
proxies serve again, + 1 s). Every echo is checked to be a prefix of what was
sent; a connection that was not cut must get all of it back: "bytes lost on
connections not cut" must be 0 (and "corrupt" always 0). Every ``--sample``
seconds it prints RSS, open fds and asyncio tasks. Exit 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from impair import Forwarder  # noqa: E402

from localproxy.config.proxy_config import ProxyConfig
from localproxy.emulator import Emulator  # noqa: E402
from localproxy.events import Connected  # noqa: E402
from localproxy.proxy.local_proxy import LocalProxy  # noqa: E402
from localproxy.settings import Settings  # noqa: E402
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort  # noqa: E402

OP_TIMEOUT = 30.0


@dataclass
class Tally:
    ok: int = 0
    cut: int = 0
    lost_bytes: int = 0  # on connections that were not cut
    lost_connections: int = 0
    corrupt: int = 0
    bytes_echoed: int = 0
    failures: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tally: dict[str, Tally] = {"interactive": Tally(), "bulk": Tally(), "churn": Tally()}
        self.disruptions: list[list[float]] = []  # [start, end]; end = inf while ongoing
        self.port = 0
        self.stop_at = 0.0
        self.connected = 0  # Connected events of both proxies

    def overlaps(self, start: float, end: float) -> bool:
        return any(start <= d_end + 1.0 and end >= d_start for d_start, d_end in self.disruptions)

    def record(self, kind: str, start: float, sent: bytes, echoed: bytes, error: str) -> None:
        tally = self.tally[kind]
        tally.bytes_echoed += len(echoed)
        if echoed != sent[: len(echoed)]:
            tally.corrupt += 1
            tally.failures.append(f"{kind}: corrupt echo")
        elif len(echoed) == len(sent):
            tally.ok += 1
        elif self.overlaps(start, time.monotonic()):
            tally.cut += 1
        else:
            tally.lost_connections += 1
            tally.lost_bytes += len(sent) - len(echoed)
            tally.failures.append(f"{kind}: {len(sent) - len(echoed)} bytes missing ({error})")

    async def exchange(self, kind: str, chunks: list[bytes], pause: float = 0.0) -> None:
        """One connection: send each chunk, read its echo; record the outcome."""
        start = time.monotonic()
        sent, echoed, error = b"", bytearray(), ""
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), OP_TIMEOUT)
            for chunk in chunks:
                sent += chunk
                writer.write(chunk)
                while len(echoed) < len(sent):
                    data = await asyncio.wait_for(reader.read(1 << 20), OP_TIMEOUT)
                    if not data:
                        raise ConnectionError("EOF")
                    echoed += data
                if pause:
                    await asyncio.sleep(pause)
                if time.monotonic() > self.stop_at:
                    sent = bytes(echoed)  # stopping: what was echoed is the whole exchange
                    break
        except (OSError, asyncio.TimeoutError) as exc:
            error = type(exc).__name__
        finally:
            if writer is not None:
                writer.transport.abort()
        self.record(kind, start, sent, bytes(echoed), error)
        if error:
            await asyncio.sleep(0.1)  # the tunnel is reconnecting: do not spin

    async def worker(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.stop_at:
            if kind == "interactive":
                chunks = [rng.randbytes(200) for _ in range(rng.randint(50, 600))]
                await self.exchange(kind, chunks, pause=0.1)
            elif kind == "bulk":
                await self.exchange(kind, [rng.randbytes(256 * 1024) for _ in range(self.args.bulk_mib * 4)])
            else:
                await self.exchange(kind, [rng.randbytes(1024)])

    async def cutter(self, forwarder: Forwarder) -> None:
        while True:
            await asyncio.sleep(self.args.cut_every)
            if time.monotonic() > self.stop_at - 5:
                return
            before = self.connected
            disruption = [time.monotonic(), float("inf")]
            self.disruptions.append(disruption)
            count = forwarder.cut()
            for _ in range(600):  # both proxies back, at most 60 s
                if self.connected >= before + 2:
                    break
                await asyncio.sleep(0.1)
            disruption[1] = time.monotonic()
            print(f"  cut {len(self.disruptions)}: {count} links aborted, both proxies back after "
                  f"{disruption[1] - disruption[0]:.2f} s", flush=True)

    def sample(self, began: float) -> str:
        rss = 0
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
        fds = len(os.listdir("/proc/self/fd"))
        tasks = len(asyncio.all_tasks())
        ok = sum(t.ok for t in self.tally.values())
        cut = sum(t.cut for t in self.tally.values())
        lost = sum(t.lost_bytes for t in self.tally.values())
        moved = sum(t.bytes_echoed for t in self.tally.values()) / 1e6
        return (f"{time.monotonic() - began:7.0f} s  RSS {rss:4d} MiB  fds {fds:4d}  tasks {tasks:4d}  "
                f"connections ok {ok:6d} cut {cut:4d}  lost bytes {lost}  echoed {moved:8.1f} MB")

    async def run(self) -> int:
        args = self.args
        settings = Settings(retry_delay_ms=200, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=100)
        async with Emulator() as emulator, Forwarder(emulator.port) as forwarder:
            echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
            tunnel = emulator.open_tunnel(services=["SSH"])
            endpoint = ServiceEndpoint.parse(forwarder.url)
            dst = LocalProxy(ProxyConfig(mode=Mode.DESTINATION, access_token=tunnel.destination_token,
                                         endpoint=endpoint, settings=settings,
                                         services={"SSH": DestinationTarget("127.0.0.1", echo.sockets[0].getsockname()[1])}))
            src = LocalProxy(ProxyConfig(mode=Mode.SOURCE, access_token=tunnel.source_token, endpoint=endpoint,
                                         settings=settings, bind_address="127.0.0.1", services={"SSH": SourcePort(0)}))
            for proxy in (src, dst):
                proxy.subscribe(self._on_event)
            async with dst, src:
                await asyncio.wait_for(asyncio.gather(dst.ready, src.ready), OP_TIMEOUT)
                await emulator.wait_connected(tunnel.tunnel_id, "destination")
                self.port = src.ports["SSH"]
                began = time.monotonic()
                self.stop_at = began + args.minutes * 60
                print(self.sample(began), flush=True)
                workers = [asyncio.create_task(self.worker(kind, seed))
                           for seed, kind in enumerate(["interactive"] * args.interactive + ["bulk"] * args.bulk
                                                       + ["churn"] * args.churn)]
                cutter = asyncio.create_task(self.cutter(forwarder))
                while time.monotonic() < self.stop_at:
                    await asyncio.sleep(min(args.sample, max(0.1, self.stop_at - time.monotonic())))
                    print(self.sample(began), flush=True)
                cutter.cancel()
                await asyncio.wait_for(asyncio.gather(*workers), OP_TIMEOUT * 2)
                print(self.sample(began), "(clients done)", flush=True)
                await asyncio.sleep(2)  # let aborted sockets and their tasks finish closing
                print(self.sample(began), "(settled)", flush=True)
            echo.close()
        return self.report()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Connected):
            self.connected += 1

    def report(self) -> int:
        print(f"cuts: {len(self.disruptions)}; recovery s: "
              + ", ".join(f"{end - start:.2f}" for start, end in self.disruptions))
        print(f"{'traffic':12}{'ok':>8}{'cut':>6}{'lost conns':>12}{'lost bytes':>12}{'corrupt':>9}{'MB echoed':>11}")
        for kind, t in self.tally.items():
            print(f"{kind:12}{t.ok:>8}{t.cut:>6}{t.lost_connections:>12}{t.lost_bytes:>12}{t.corrupt:>9}"
                  f"{t.bytes_echoed / 1e6:>11.1f}")
        failures = [line for t in self.tally.values() for line in t.failures]
        for line in failures[:20]:
            print("  FAIL", line)
        return 1 if failures else 0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--cut-every", type=float, default=180.0, help="seconds between cuts (default 180)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--interactive", type=int, default=4, help="interactive clients (default 4)")
    parser.add_argument("--bulk", type=int, default=2, help="bulk clients (default 2)")
    parser.add_argument("--bulk-mib", type=int, default=8, help="MiB per bulk connection (default 8)")
    parser.add_argument("--churn", type=int, default=2, help="churning clients (default 2)")
    parser.add_argument("--verbose", action="store_true", help="show the proxies' warnings (one per refused connection)")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("localproxy").setLevel(logging.ERROR)
    return asyncio.run(Soak(args).run())


if __name__ == "__main__":
    sys.exit(main())
