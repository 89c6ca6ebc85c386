"""The tunnel over a long-delay link vs plain TCP over the same link, side by side.

Run: ``python benchmarks/bench_network.py [--delay-ms 100] [--size 16] [--repeat 3]``.

Two instances of the impairment forwarder (``tests/impair.py``, same settings:
``--delay-ms`` added per direction, pipelined, ``--window`` bytes in flight per
direction like a TCP window, optional ``--bandwidth``) carry:

- plain: client -> forwarder -> app (the same apps as ``bench_tunnel.py``);
- tunnel: client -> source proxy -> forwarder -> emulator -> destination proxy -> app
  (only the source's websocket crosses the slow link, as a user's laptop on a
  cellular network).

Figures: MB/s of ``--size`` MiB up (to the sink) and down (from the source app),
sha256 checked, median of ``--repeat``; 64-byte echo round trips (p50/p99 ms) on an
idle connection. "ratio" is tunnel / plain in the same run (goal: >= 0.5 for
bulk; echo near the RTT, 2 x delay). Children are separate processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _clients  # noqa: E402
from _rig import (  # noqa: E402
    OURS_SOURCE,
    ROOT,
    Child,
    ControlPlane,
    start_apps,
    start_emulator,
    start_pair,
    write_settings,
)

MIB = 1024 * 1024


def start_forwarder(log_dir: Path, name: str, target: int, args: argparse.Namespace) -> tuple[Child, int]:
    argv = [sys.executable, str(ROOT / "tests" / "impair.py"), "--target", str(target),
            "--delay-ms", str(args.delay_ms), "--window", str(args.window)]
    if args.bandwidth:
        argv += ["--bandwidth", str(args.bandwidth)]
    child = Child(name, argv, log_dir, stdin_pipe=True, json_stdout=True)
    return child, int(child.read_json_line(30)["port"])


def median_transfer(run: Callable[[], _clients.Transfer], repeat: int) -> dict[str, Any]:
    transfers = [run() for _ in range(repeat)]
    broken = [t.error for t in transfers if not t.intact]
    return {"mb_s": round(statistics.median(t.mb_per_s for t in transfers), 2), "failed": broken}


def echo_ms(port: int, args: argparse.Namespace) -> dict[str, float]:
    samples = _clients.echo_latency(port, args.round_trips, args.client_timeout)
    return {"p50": round(statistics.median(samples) / 1000, 1),
            "p99": round(sorted(samples)[int(0.99 * (len(samples) - 1))] / 1000, 1)}


def bulk(direction: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    client = _clients.upload if direction == "up" else _clients.download
    return median_transfer(lambda: client(port, args.size * MIB, args.client_timeout), args.repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=100.0, help="added delay per direction (default 100)")
    parser.add_argument("--size", type=int, default=16, help="MiB per transfer (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per direction (median reported)")
    parser.add_argument("--round-trips", type=int, default=20, help="echo round trips (default 20)")
    parser.add_argument("--window", type=int, default=4 * MIB, help="forwarder bytes in flight per direction")
    parser.add_argument("--bandwidth", type=float, help="forwarder bytes/s per direction (default: none)")
    parser.add_argument("--client-timeout", type=float, default=120, help="socket timeout of each client")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--logs", type=Path, help="keep the children's logs in this directory")
    args = parser.parse_args(argv)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-network-") as temp:
        log_dir = args.logs or Path(temp)
        log_dir.mkdir(parents=True, exist_ok=True)
        children: list[Child] = []
        try:
            emulator, info = start_emulator(log_dir, tls=False)
            apps, args.app_ports = start_apps(log_dir)
            children += [emulator, apps]
            results: dict[str, Any] = {"delay_ms_each_way": args.delay_ms, "size_mib": args.size,
                                       "window_bytes": args.window, "bandwidth": args.bandwidth}
            # plain TCP: one forwarder per app port (same program, same settings)
            plain: dict[str, Any] = {}
            for name in ("sink", "source", "echo"):
                child, port = start_forwarder(log_dir, f"forwarder-{name}", args.app_ports[name], args)
                children.append(child)
                plain[name] = port
            results["plain"] = {"up": bulk("up", plain["sink"], args), "down": bulk("down", plain["source"], args),
                                "echo_ms": echo_ms(plain["echo"], args)}
            # the tunnel: the source proxy's websocket goes through a forwarder to the emulator
            emulator_port = int(info.data.rsplit(":", 1)[1])
            child, fwd_port = start_forwarder(log_dir, "forwarder-ws", emulator_port, args)
            children.append(child)
            source_template = OURS_SOURCE.replace("{endpoint}", f"ws://127.0.0.1:{fwd_port}")
            control = ControlPlane(info)
            settings = write_settings(log_dir / "settings.json", max_connections=128)
            tunnel: dict[str, Any] = {}
            for app in ("sink", "source", "echo"):
                pair = start_pair(control, info, log_dir, f"tunnel-{app}", "BENCH", args.app_ports[app], settings,
                                  source_template=source_template)
                try:
                    if app == "sink":
                        tunnel["up"] = bulk("up", pair.port, args)
                    elif app == "source":
                        tunnel["down"] = bulk("down", pair.port, args)
                    else:
                        tunnel["echo_ms"] = echo_ms(pair.port, args)
                finally:
                    pair.stop()
            results["tunnel"] = tunnel
        finally:
            for child in reversed(children):
                child.stop()
    results["ratio"] = {
        "up": round(results["tunnel"]["up"]["mb_s"] / results["plain"]["up"]["mb_s"], 2),
        "down": round(results["tunnel"]["down"]["mb_s"] / results["plain"]["down"]["mb_s"], 2),
        "echo_p50": round(results["tunnel"]["echo_ms"]["p50"] / results["plain"]["echo_ms"]["p50"], 2),
    }
    results["seconds"] = round(time.monotonic() - began, 1)
    print(f"delay {args.delay_ms:g} ms each way, {args.size} MiB, window {args.window // 1024} KiB, "
          f"bandwidth {args.bandwidth or 'unlimited'}")
    print(f"{'':12}{'plain TCP':>12}{'tunnel':>12}{'ratio':>8}")
    for key, unit in (("up", "MB/s"), ("down", "MB/s")):
        print(f"{key + ' ' + unit:12}{results['plain'][key]['mb_s']:>12}{results['tunnel'][key]['mb_s']:>12}"
              f"{results['ratio'][key]:>8}")
    print(f"{'echo p50 ms':12}{results['plain']['echo_ms']['p50']:>12}{results['tunnel']['echo_ms']['p50']:>12}"
          f"{results['ratio']['echo_p50']:>8}")
    print(f"{'echo p99 ms':12}{results['plain']['echo_ms']['p99']:>12}{results['tunnel']['echo_ms']['p99']:>12}")
    failures = results["plain"]["up"]["failed"] + results["plain"]["down"]["failed"] + \
        results["tunnel"]["up"]["failed"] + results["tunnel"]["down"]["failed"]
    if failures:
        print("FAILED transfers:", failures)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
