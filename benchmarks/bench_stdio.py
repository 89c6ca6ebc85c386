"""``--stdio`` vs a TCP source port: bulk MB/s both ways and 64-byte echo p50, side by side.

Run: ``python benchmarks/bench_stdio.py [--quick] [--size MiB] [--round-trips N]``.

One emulator, one app process (``_apps.py``) and one destination proxy process
(``python -m localproxy -d``) serve both columns. The TCP column is a
``python -m localproxy -s`` process and blocking client sockets; the stdio column
is one ``python -m localproxy --stdio SERVICE`` process per measurement, its
stdin/stdout pipes driven with blocking ``os.read``/``os.write`` (as ssh drives a
ProxyCommand). Every stdio run reuses one access token through
``--client-token-file``. The clock starts once the connection is open (stdio:
the proxy's "Accepted in-process connection" line on stderr; TCP: connect()), so
process start-up is not in the figures. Issue 19's goal: stdio >= 80% of TCP.

Figures: MB = 1e6 bytes; sha256 of every transfer is checked. Each bulk figure
is the median of ``--repeat`` runs. "source CPU" is the user+system CPU seconds
per GiB moved of the source proxy process (the ``--stdio`` one includes its
stdin/stdout relay), from /proc (Linux): steadier than MB/s on a busy machine. Bounded: every wait has a deadline, every
child is killed at exit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _clients  # noqa: E402
from _apps import CHUNK, REQUEST, chunks, expected_digest, pool  # noqa: E402
from _rig import (  # noqa: E402
    ROOT,
    Child,
    ControlPlane,
    RigError,
    cpu_seconds,
    free_port,
    listening_ports,
    start_apps,
    start_emulator,
    wait_until,
)

MIB = 1024**2
T = TypeVar("T")
SERVICES = {"SINK": "sink", "SOURCE": "source", "ECHO": "echo"}


class StdioProxy:
    """``python -m localproxy --stdio SERVICE`` with pipes; ready once its connection is open."""

    def __init__(self, endpoint: str, service: str, token: str, token_file: Path, log: Path, timeout: float):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
        argv = [sys.executable, "-m", "localproxy", "-e", endpoint, "--stdio", service,
                "--client-token-file", str(token_file)]  # fmt: skip
        self.process = subprocess.Popen(
            argv, cwd=str(ROOT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stdin and self.process.stdout and self.process.stderr
        self.stdin = self.process.stdin.fileno()
        self.stdout = self.process.stdout.fileno()
        self._opened = threading.Event()
        self._log = open(log, "ab")
        threading.Thread(target=self._watch_stderr, daemon=True).start()
        if not self._opened.wait(timeout):
            self.close()
            raise RigError(f"--stdio {service}: no connection within {timeout} s (log: {log})")

    def _watch_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._log.write(line)
            if b"Accepted stdio connection" in line or b"Accepted in-process connection" in line:
                self._opened.set()

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdin, view) :]

    def read_exactly(self, size: int, digest: "hashlib._Hash | None" = None) -> bytes:
        parts, got = [], 0
        while got < size:
            part = os.read(self.stdout, min(size - got, 4 * CHUNK))
            if not part:
                raise ConnectionError(f"stdout closed after {got} of {size} bytes")
            got += len(part)
            if digest is not None:
                digest.update(part)
            else:
                parts.append(part)
        return b"".join(parts)

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            code = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(15)
        return code


def stdio_upload(proxy: StdioProxy, size: int) -> float:
    start = time.perf_counter()
    proxy.write_all(REQUEST.pack(size, 0, 0))
    for part in chunks(size):
        proxy.write_all(part)
    if proxy.read_exactly(32) != expected_digest(size):
        raise RigError("upload over stdio: sha256 differs")
    return size / (time.perf_counter() - start) / 1e6


def stdio_download(proxy: StdioProxy, size: int) -> float:
    digest = hashlib.sha256()
    start = time.perf_counter()
    proxy.write_all(REQUEST.pack(size, 0, 0))
    proxy.read_exactly(size, digest)
    seconds = time.perf_counter() - start
    if digest.digest() != expected_digest(size):
        raise RigError("download over stdio: sha256 differs")
    return size / seconds / 1e6


def stdio_echo(proxy: StdioProxy, round_trips: int) -> list[float]:
    message = bytes(pool()[:64])
    samples = []
    for index in range(round_trips + 20):  # 20 warm-up round trips
        start = time.perf_counter_ns()
        proxy.write_all(message)
        if proxy.read_exactly(64) != message:
            raise RigError("echo over stdio differs")
        if index >= 20:
            samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 MiB, 300 round trips, 1 repeat")
    parser.add_argument("--size", type=int, default=128, help="MiB per bulk transfer (default 128)")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for any one wait")
    args = parser.parse_args()
    if args.quick:
        args.size, args.round_trips, args.repeat = 8, 300, 1
    size = args.size * MIB
    log_dir = Path(tempfile.mkdtemp(prefix="bench-stdio-"))
    children: list[Child] = []
    try:
        emulator, info = start_emulator(log_dir, tls=False)
        children.append(emulator)
        apps, app_ports = start_apps(log_dir)
        children.append(apps)
        control = ControlPlane(info)
        tunnel = control.open_tunnel(*SERVICES)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
        destination_map = ",".join(f"{s}=127.0.0.1:{app_ports[a]}" for s, a in SERVICES.items())
        children.append(Child("destination", [sys.executable, "-m", "localproxy", "-e", info.data, "-v", "3",
                                              "-d", destination_map], log_dir,
                              env={**env, "AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["destinationAccessToken"]}))

        def destination_connected() -> bool:
            state = control.client.describe_tunnel(tunnelId=tunnel["tunnelId"])["tunnel"]
            return bool(state["destinationConnectionState"]["status"] == "CONNECTED")

        wait_until(destination_connected, args.timeout, "the destination to connect", interval=0.05)

        results: dict[str, dict[str, float]] = {"tcp": {}, "stdio": {}}
        token_file = log_dir / "client-token"

        def stdio(service: str) -> StdioProxy:
            return StdioProxy(info.data, service, tunnel["sourceAccessToken"], token_file, log_dir / "stdio.log",
                              args.timeout)  # fmt: skip

        stdio_cpu: dict[str, list[float]] = {"SINK": [], "SOURCE": []}

        def run_stdio(service: str, measure: Callable[[StdioProxy], T]) -> T:
            proxy = stdio(service)
            try:
                before = cpu_seconds(proxy.process.pid)
                result = measure(proxy)
                if service in stdio_cpu:
                    stdio_cpu[service].append(cpu_seconds(proxy.process.pid) - before)
                return result
            finally:
                code = proxy.close()
                if code != 0:
                    raise RigError(f"--stdio {service} exited {code} (log: {log_dir / 'stdio.log'})")

        # stdio first: each run's token reuse is what --client-token-file is for.
        up = [run_stdio("SINK", lambda p: stdio_upload(p, size)) for _ in range(args.repeat)]
        down = [run_stdio("SOURCE", lambda p: stdio_download(p, size)) for _ in range(args.repeat)]
        echo = run_stdio("ECHO", lambda p: stdio_echo(p, args.round_trips))
        gib = size * args.repeat / 1024**3
        results["stdio"] = {"up": statistics.median(up), "down": statistics.median(down),
                            "echo_p50": statistics.median(echo),
                            "cpu_up": sum(stdio_cpu["SINK"]) / gib, "cpu_down": sum(stdio_cpu["SOURCE"]) / gib}

        ports = {service: free_port() for service in SERVICES}
        source_map = ",".join(f"{s}={p}" for s, p in ports.items())
        children.append(Child("tcp-source", [sys.executable, "-m", "localproxy", "-e", info.data, "-v", "3",
                                             "--client-token-file", str(token_file), "-b", "127.0.0.1",
                                             "-s", source_map], log_dir,
                              env={**env, "AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]}))
        wait_until(lambda: set(ports.values()) <= listening_ports(), args.timeout, "the TCP source to listen")
        tcp_pid = children[-1].pid
        before = cpu_seconds(tcp_pid)
        transfers_up = [_clients.upload(ports["SINK"], size, args.timeout) for _ in range(args.repeat)]
        middle = cpu_seconds(tcp_pid)
        transfers_down = [_clients.download(ports["SOURCE"], size, args.timeout) for _ in range(args.repeat)]
        after = cpu_seconds(tcp_pid)
        for transfer in transfers_up + transfers_down:
            if not transfer.intact:
                raise RigError(f"TCP transfer failed: {transfer.error}")
        results["tcp"] = {
            "up": statistics.median(t.mb_per_s for t in transfers_up),
            "down": statistics.median(t.mb_per_s for t in transfers_down),
            "echo_p50": statistics.median(_clients.echo_latency(ports["ECHO"], args.round_trips, args.timeout)),
            "cpu_up": (middle - before) / gib, "cpu_down": (after - middle) / gib,
        }
    except RigError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            child.stop()

    print(f"--stdio vs TCP source port: {args.size} MiB transfers (median of {args.repeat}), "
          f"{args.round_trips} echo round trips; logs in {log_dir}")  # fmt: skip
    print(f"{'':24}{'TCP source':>12}{'--stdio':>12}{'stdio/TCP':>12}")
    rows = (("up", "bulk up", "MB/s"), ("down", "bulk down", "MB/s"), ("echo_p50", "echo p50", "us"),
            ("cpu_up", "source CPU up", "s/GiB"), ("cpu_down", "source CPU down", "s/GiB"))
    for key, label, unit in rows:
        tcp, std = results["tcp"][key], results["stdio"][key]
        print(f"{label + ' (' + unit + ')':24}{tcp:12.2f}{std:12.2f}{std / tcp if tcp else 0:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
