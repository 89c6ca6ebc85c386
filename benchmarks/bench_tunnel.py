"""End-to-end tunnel benchmark: client -> source proxy -> emulator -> destination proxy -> app.

Run: ``python benchmarks/bench_tunnel.py [--quick] [--tls] [--size MiB] [--json FILE]``.

Every scenario gets a fresh tunnel and a fresh pair of proxy processes (so each
peak RSS belongs to that scenario), started from command templates; the default
ones run this project's ``python -m localproxy``. Another local proxy binary can
be measured on the same rig with ``--source-template``/``--destination-template``
(placeholders listed in ``_rig.py``; the access token is in
``AWSIOT_TUNNEL_ACCESS_TOKEN``). The emulator (``python -m localproxy.emulator``)
and the apps (``_apps.py``) are separate processes too.

Figures (1 MB = 1e6 bytes; CPU = user + system seconds from /proc; peak RSS = VmHWM):

- bulk up/down: one connection, ``--size`` MiB, sha256 checked, ``--repeat``
  times on one pair (median MB/s; CPU-s per GiB of each proxy and of the
  emulator over all of them);
- echo: p50/p99 microseconds of 64-byte round trips on one connection;
- new connection: connect, send 1 byte, time to its echo, one after another;
- 100 / 1000 simultaneous connections each echoing a block: aggregate MB/s (one
  way), how many succeeded, time to first byte p50/p99. The proxies get a
  settings file (``{settings}``) raising ``tcp.max_active_connections`` (default
  128, as in the reference) above that count;
- slow reader: ``--size`` MiB to an app that stalls 1 s then reads at
  ``--slow-rate`` MiB/s: peak RSS of each proxy;
- baseline: the same clients straight to the apps, in the same run; "vs base" is
  ours / baseline (the fraction of its throughput, or how many times its latency).

``--py-spy DIR`` samples both proxies and the emulator during each scenario
(collapsed stacks, ``py-spy`` from PyPI) to find hot spots; ``--logs DIR`` keeps
every child's log.

The whole run is bounded by ``--deadline`` seconds (each client has a socket timeout).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _clients  # noqa: E402
from _rig import (  # noqa: E402
    OURS_DESTINATION,
    OURS_SOURCE,
    Child,
    ControlPlane,
    EmulatorInfo,
    ProxyPair,
    RigError,
    cpu_seconds,
    memory_kib,
    reset_peak_rss,
    start_apps,
    start_emulator,
    start_pair,
    start_py_spy,
    write_settings,
)

GIB = 1024**3
MIB = 1024**2

# The C++ reference local proxy on a 2-core machine through a non-parsing relay (issue 6).
REFERENCE = {
    "bulk_up_mb_s": 140.0,
    "bulk_down_mb_s": 140.0,
    "cpu_s_per_gib_sending": 2.5,
    "cpu_s_per_gib_receiving": 1.3,
    "echo_p50_us": 470.0,
    "new_connection_ms": 45.0,
    "slow_reader_peak_rss_mib": 250.0,
}
GOALS = {
    "cpu_s_per_gib_sending": 2.5 * 1.5,
    "cpu_s_per_gib_receiving": 1.3 * 1.5,
    "new_connection_p50_ms": 3.0,
    "peak_rss_mib": 64.0,
}


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Bench:
    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.args = args
        self.log_dir = log_dir
        self.deadline = time.monotonic() + args.deadline
        self.results: dict[str, Any] = {}
        self.emulator: Child | None = None
        self.apps: Child | None = None
        self.info: EmulatorInfo | None = None
        self.ports: dict[str, int] = {}
        self.control: ControlPlane | None = None
        self.settings = write_settings(log_dir / "settings.json", max_connections=args.max_connections + 100)

    # --- set-up ------------------------------------------------------------------

    def start(self) -> None:
        self.emulator, self.info = start_emulator(self.log_dir, self.args.tls, autotuned_buffers=self.args.autotuned_buffers)
        self.apps, self.ports = start_apps(self.log_dir)
        self.control = ControlPlane(self.info)

    def stop(self) -> None:
        for child in (self.apps, self.emulator):
            if child is not None:
                child.stop()

    def timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 5:
            raise RigError("the benchmark's --deadline passed")
        return min(left, self.args.client_timeout)

    def pair(self, tag: str, app: str) -> ProxyPair:
        assert self.control is not None and self.info is not None
        return start_pair(
            self.control, self.info, self.log_dir, tag, "BENCH", self.ports[app], self.settings,
            self.args.source_template, self.args.destination_template, timeout=min(30, self.timeout()),
        )

    # --- measuring one scenario through a fresh pair ------------------------------

    def through_tunnel(self, tag: str, app: str, run: Callable[[int], Any]) -> tuple[Any, dict[str, Any]]:
        """Run ``run(port)`` through a fresh pair; return its result and the processes' costs."""
        assert self.emulator is not None
        pair = self.pair(tag, app)
        samplers: list[Child] = []
        try:
            pids = {"source": pair.source.pid, "destination": pair.destination.pid, "emulator": self.emulator.pid}
            for name in ("source", "destination"):
                reset_peak_rss(pids[name])
            if self.args.py_spy:
                samplers = [start_py_spy(pid, self.args.py_spy / f"{tag}-{name}.txt", self.log_dir)
                            for name, pid in pids.items()]
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            result = run(pair.port)
            cost = {
                "cpu_s": {name: round(cpu_seconds(pid) - cpu_before[name], 3) for name, pid in pids.items()},
                "peak_rss_mib": {name: round(memory_kib(pids[name], "VmHWM") / 1024, 1)
                                 for name in ("source", "destination")},
            }
            alive = {child.name: child.alive() for child in pair.children}
            if not all(alive.values()):
                cost["died"] = alive
        finally:
            for sampler in samplers:
                sampler.stop(signal_number=signal.SIGINT)
            codes = pair.stop()
        cost["exit_codes"] = codes
        return result, cost

    # --- scenarios ------------------------------------------------------------------

    def bulk(self, direction: str) -> None:
        """``--repeat`` transfers on one pair: the median MB/s, CPU over all of them."""
        size = self.args.size * MIB
        repeat = self.args.repeat
        client = _clients.upload if direction == "up" else _clients.download
        app = "sink" if direction == "up" else "source"

        def transfers(port: int) -> _clients.Transfer:
            runs = [client(port, size, self.timeout()) for _ in range(repeat)]
            broken = [run for run in runs if not run.intact]
            if broken:
                return broken[0]
            return sorted(runs, key=lambda run: run.seconds)[len(runs) // 2]

        base = transfers(self.ports[app])
        ours, cost = self.through_tunnel(f"bulk-{direction}", app, transfers)
        gib = size * repeat / GIB
        sending, receiving = ("source", "destination") if direction == "up" else ("destination", "source")
        self.results[f"bulk_{direction}"] = {
            "size_mib": self.args.size,
            "repeat": repeat,
            "intact": ours.intact,
            "error": ours.error,
            "mb_s": round(ours.mb_per_s, 1),
            "baseline_mb_s": round(base.mb_per_s, 1),
            "cpu_s_per_gib": {
                "sending_proxy": round(cost["cpu_s"][sending] / gib, 2),
                "receiving_proxy": round(cost["cpu_s"][receiving] / gib, 2),
                "emulator": round(cost["cpu_s"]["emulator"] / gib, 2),
            },
            **cost,
        }

    def echo(self) -> None:
        count = self.args.round_trips
        base = _clients.echo_latency(self.ports["echo"], count, self.timeout())
        ours, cost = self.through_tunnel("echo", "echo", lambda port: _clients.echo_latency(port, count, self.timeout()))
        self.results["echo_64b"] = {
            "round_trips": count,
            "p50_us": round(percentile(ours, 0.5), 1),
            "p99_us": round(percentile(ours, 0.99), 1),
            "baseline_p50_us": round(percentile(base, 0.5), 1),
            "baseline_p99_us": round(percentile(base, 0.99), 1),
            **cost,
        }

    def new_connection(self) -> None:
        count = self.args.new_connections
        base, base_failures = _clients.new_connections(self.ports["echo"], count, self.timeout())
        (ours, failures), cost = self.through_tunnel(
            "connect", "echo", lambda port: _clients.new_connections(port, count, self.timeout()))
        self.results["new_connection"] = {
            "connections": count,
            "failed": failures,
            "p50_ms": round(percentile(ours, 0.5) / 1000, 3),
            "p99_ms": round(percentile(ours, 0.99) / 1000, 3),
            "baseline_p50_ms": round(percentile(base, 0.5) / 1000, 3),
            "baseline_p99_ms": round(percentile(base, 0.99) / 1000, 3),
            **cost,
        }

    def concurrent(self, connections: int) -> None:
        per = self.args.per_connection_kib * 1024
        base = _clients.concurrent_echo(self.ports["echo"], connections, per, self.timeout())
        ours, cost = self.through_tunnel(
            f"concurrent-{connections}", "echo",
            lambda port: _clients.concurrent_echo(port, connections, per, self.timeout()))
        self.results[f"concurrent_{connections}"] = {
            "connections": connections,
            "per_connection_kib": self.args.per_connection_kib,
            "succeeded": ours.succeeded,
            "errors": ours.errors,
            "mb_s": round(ours.mb_per_s, 1),
            "first_byte_p50_ms": round(percentile(ours.first_byte_us, 0.5) / 1000, 2),
            "first_byte_p99_ms": round(percentile(ours.first_byte_us, 0.99) / 1000, 2),
            "baseline_succeeded": base.succeeded,
            "baseline_mb_s": round(base.mb_per_s, 1),
            "baseline_first_byte_p50_ms": round(percentile(base.first_byte_us, 0.5) / 1000, 2),
            **cost,
        }

    def slow_reader(self) -> None:
        size = self.args.size * MIB
        rate_kib = int(self.args.slow_rate * 1024)
        ours, cost = self.through_tunnel(
            "slow-reader", "sink",
            lambda port: _clients.upload(port, size, self.timeout(), rate_kib=rate_kib, stall_ms=1000))
        self.results["slow_reader"] = {
            "size_mib": self.args.size,
            "reader_mib_s": self.args.slow_rate,
            "intact": ours.intact,
            "error": ours.error,
            "seconds": round(ours.seconds, 2),
            **cost,
        }

    def run(self) -> None:
        scenarios: list[tuple[str, Callable[[], None]]] = [
            ("bulk_up", lambda: self.bulk("up")),
            ("bulk_down", lambda: self.bulk("down")),
            ("echo_64b", self.echo),
            ("new_connection", self.new_connection),
            ("concurrent_100", lambda: self.concurrent(100)),
            (f"concurrent_{self.args.max_connections}", lambda: self.concurrent(self.args.max_connections)),
            ("slow_reader", self.slow_reader),
        ]
        only = set(self.args.only.split(",")) if self.args.only else None
        for name, scenario in scenarios:
            if only and name not in only:
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            try:
                scenario()
            except RigError as error:
                self.results[name] = {"error": str(error)}
                print(f"    {name} failed: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: 32 MiB, 500 round trips, 100 connections")
    parser.add_argument("--tls", action="store_true", help="wss:// (emulator with a generated CA; proxies get -c)")
    parser.add_argument("--size", type=int, help="MiB per bulk / slow-reader transfer (default 256, quick 32)")
    parser.add_argument("--round-trips", type=int, help="echo round trips (default 2000, quick 500)")
    parser.add_argument("--new-connections", type=int, help="sequential new connections (default 200, quick 100)")
    parser.add_argument("--max-connections", type=int, help="the large simultaneous scenario (default 1000, quick 300)")
    parser.add_argument("--per-connection-kib", type=int, default=64, help="bytes each simultaneous connection echoes")
    parser.add_argument("--slow-rate", type=float, default=32.0, help="slow reader's MiB/s after its 1 s stall")
    parser.add_argument("--repeat", type=int, default=3, help="bulk transfers per direction (median reported)")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--py-spy", type=Path, help="sample every proxy and the emulator with py-spy into this "
                        "directory (collapsed stacks; slows them down: CPU figures are then not comparable)")
    parser.add_argument("--source-template", default=OURS_SOURCE, help="source proxy command (see _rig.py)")
    parser.add_argument("--destination-template", default=OURS_DESTINATION, help="destination proxy command")
    parser.add_argument("--scenario", choices=("standard", "interactive"), default="standard",
                        help="standard: the scenarios above; interactive: echo latency under bulk, capped and "
                        "uncapped, and fairness (see _interactive.py)")
    parser.add_argument("--cap", type=float, default=800_000, help="interactive: the capped link, bytes/s per "
                        "direction (default 800000, the service's figure)")
    parser.add_argument("--autotuned-buffers", action="store_true", help="run the emulator with "
                        "--autotuned-buffers (the kernel's socket buffers, megabytes per direction)")
    parser.add_argument("--links", default="uncapped,capped", help="interactive: which links to measure "
                        "(comma-separated: uncapped, capped)")
    parser.add_argument("--warmup", type=float, default=2.0, help="interactive: seconds of bulk before probing")
    parser.add_argument("--window", type=float, default=5.0, help="interactive: seconds of probing")
    parser.add_argument("--with-reference", action="store_true",
                        help="interactive: measure the C++ reference binary too, in the same run")
    parser.add_argument("--with-base", metavar="DIR", help="interactive: measure another checkout of this "
                        "project too (e.g. a worktree of main before a change), in the same run")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--logs", type=Path, help="keep the children's logs in this directory")
    parser.add_argument("--deadline", type=float, default=900, help="seconds the whole run may take")
    parser.add_argument("--client-timeout", type=float, default=120, help="socket timeout of each client")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (32 if quick else 256)
    args.round_trips = args.round_trips or (500 if quick else 2000)
    args.new_connections = args.new_connections or (100 if quick else 200)
    args.max_connections = args.max_connections or (300 if quick else 1000)

    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as temp:
        log_dir = args.logs or Path(temp)
        log_dir.mkdir(parents=True, exist_ok=True)
        if args.scenario == "interactive":
            from _interactive import print_interactive, run_interactive

            interactive = run_interactive(args, log_dir)
            print_interactive(interactive)
            if args.json:
                args.json.write_text(json.dumps(interactive, indent=2) + "\n")
            return 0
        if args.py_spy:
            args.py_spy.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, log_dir)
        began = time.monotonic()
        try:
            bench.start()
            bench.run()
        finally:
            bench.stop()
        results = {
            "machine": {"python": platform.python_version(), "cpus": _cpu_count(), "tls": args.tls,
                        "source_template": args.source_template, "destination_template": args.destination_template},
            "seconds": round(time.monotonic() - began, 1),
            "reference_cpp": REFERENCE,
            "goals": GOALS,
            **bench.results,
        }
    from _report import print_table

    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
