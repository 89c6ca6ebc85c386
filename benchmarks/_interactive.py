"""The interactive scenario: 64-byte echoes while bulk transfers share the tunnel.

``python benchmarks/bench_tunnel.py --scenario interactive`` (see ``bench_tunnel.py``)
runs, for each proxy implementation (ours; ``--with-reference`` adds the C++ binary;
``--with-base DIR`` another checkout of ours), through one tunnel with services
ECHO (echo app) and BULK (sink or source app):

- echo alone (unloaded), then echo under one bulk upload and under one bulk
  download, uncapped and through a second emulator capped with ``--bandwidth``
  (default 800 kB/s, the service's figure): echo p50/p99/max and how many probes
  timed out, and the bulk rate during the probes (and its share of the cap), as
  the receiving app counts it;
- capped, four bulk downloads at once: each one's kB/s and its distance from the
  mean share.

The bulk clients run in a child process (this file, ``bulk`` sub-command) so their
CPU and the GIL do not delay the probes. Probes: one every ``PROBE_INTERVAL`` s on
one connection, after ``--warmup`` seconds of bulk, for ``--window`` seconds; a
probe waits at most ``PROBE_TIMEOUT`` s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _apps import CHUNK, REQUEST, pool  # noqa: E402
from _rig import (  # noqa: E402
    OURS_DESTINATION,
    OURS_SOURCE,
    REFERENCE_BINARY,
    REFERENCE_DESTINATION,
    REFERENCE_SOURCE,
    Child,
    ControlPlane,
    ProxyPair,
    RigError,
    start_apps,
    start_emulator,
    start_pair,
    write_settings,
)

PROBE_INTERVAL = 0.02
PROBE_TIMEOUT = 5.0
ENDLESS = 1 << 50  # bytes asked of the apps: the client stops first


# --- the bulk child --------------------------------------------------------------------


def _bulk_connection(port: int, direction: str, stop: threading.Event, counts: list[int], index: int) -> None:
    """Upload to the count app (``counts`` = what it says arrived) or download from the source app."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT * 4) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if direction == "up":
            def read_totals() -> None:
                buffer = b""
                while not stop.is_set():
                    part = sock.recv(4096)
                    if not part:
                        return
                    buffer += part
                    whole = len(buffer) // 8 * 8
                    if whole:
                        counts[index] = int.from_bytes(buffer[whole - 8 : whole], "big")
                        buffer = buffer[whole:]

            threading.Thread(target=read_totals, daemon=True).start()
            data = bytes(pool()[:CHUNK])
            while not stop.is_set():
                sock.sendall(data)
        else:
            sock.sendall(REQUEST.pack(ENDLESS, 0, 0))
            buffer = bytearray(CHUNK)
            while not stop.is_set():
                count = sock.recv_into(buffer)
                if not count:
                    raise ConnectionError("the source app closed")
                counts[index] += count


def bulk_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_interactive.py bulk")
    parser.add_argument("--direction", choices=("up", "down"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--window", type=float, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    counts = [0] * args.connections
    errors: list[str] = []

    def run(index: int) -> None:
        try:
            _bulk_connection(args.port, args.direction, stop, counts, index)
        except OSError as error:
            if not stop.is_set():
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    print(json.dumps({"started": True}), flush=True)
    time.sleep(args.warmup)  # a benchmark's warm-up: the queues fill
    before = list(counts)
    began = time.monotonic()
    time.sleep(args.window)
    window = [now - then for now, then in zip(counts, before)]
    seconds = time.monotonic() - began
    stop.set()
    print(json.dumps({"bytes": window, "seconds": seconds, "errors": errors}), flush=True)
    return 0


# --- probes ----------------------------------------------------------------------------------


def echo_probes(port: int, seconds: float) -> tuple[list[float], int]:
    """64-byte round trips (ms), one per PROBE_INTERVAL for ``seconds``; and the timeouts."""
    message = bytes(pool()[:64])
    samples: list[float] = []
    timeouts = 0
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(int(seconds / PROBE_INTERVAL) + 1):
            if time.monotonic() >= deadline:
                break
            start = time.perf_counter()
            sock.sendall(message)
            received = b""
            try:
                while len(received) < len(message):
                    part = sock.recv(len(message) - len(received))
                    if not part:
                        raise ConnectionError("echo connection closed")
                    received += part
            except socket.timeout:
                timeouts += 1
                break  # the connection's stream is now out of step: stop probing
            samples.append((time.perf_counter() - start) * 1000)
            if received != message:
                raise ConnectionError("echo differs")
            pause = PROBE_INTERVAL - (time.perf_counter() - start)
            if pause > 0:
                time.sleep(pause)
    return samples, timeouts


def latency_summary(samples: list[float], timeouts: int) -> dict[str, Any]:
    ordered = sorted(samples)

    def pick(fraction: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))], 2)

    return {"probes": len(samples), "timeouts": timeouts, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1], 2) if ordered else None}


# --- the scenario ---------------------------------------------------------------------------


def _lines(child: Child, count: int, timeout: float) -> list[dict[str, Any]]:
    """The next ``count`` JSON lines of a child's stdout (a bounded wait)."""
    assert child.process.stdout is not None
    fd = child.process.stdout.fileno()
    os.set_blocking(fd, False)
    buffer = child.__dict__.setdefault("_pending", b"")
    deadline = time.monotonic() + timeout
    while buffer.count(b"\n") < count:
        if time.monotonic() > deadline:
            raise RigError(f"{child.name} gave no result; its log:\n{child.log_tail()}")
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            raise RigError(f"{child.name} exited without a result; its log:\n{child.log_tail()}")
        buffer += chunk
    *lines, rest = buffer.split(b"\n", count)
    child.__dict__["_pending"] = rest
    return [json.loads(line) for line in lines]


def implementations(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, source template, destination template) of each proxy to measure."""
    impls = [("ours", args.source_template, args.destination_template)]
    if args.with_base:
        base = Path(args.with_base).resolve()
        # Run from inside that checkout: ``-m`` puts the working directory first on sys.path.
        impls.append(("base", f"env -C {base} " + OURS_SOURCE, f"env -C {base} " + OURS_DESTINATION))
    if args.with_reference:
        if REFERENCE_BINARY.exists():
            impls.append(("c++", REFERENCE_SOURCE, REFERENCE_DESTINATION))
        else:
            print(f"    no C++ reference at {REFERENCE_BINARY}: skipped", file=sys.stderr)
    return impls


def _with_bulk(pair: ProxyPair, log_dir: Path, tag: str, direction: str, connections: int, warmup: float,
               window: float, probe: bool) -> dict[str, Any]:
    port = pair.ports["UP" if direction == "up" else "DOWN"]
    argv = [sys.executable, str(Path(__file__)), "bulk", "--direction", direction, "--port", str(port),
            "--connections", str(connections), "--warmup", str(warmup), "--window", str(window)]
    child = Child(f"{tag}-bulk", argv, log_dir, json_stdout=True)
    try:
        _lines(child, 1, 30)
        time.sleep(warmup)  # let the bulk transfer fill every queue before probing
        result: dict[str, Any] = {}
        if probe:
            result.update(latency_summary(*echo_probes(pair.ports["ECHO"], window)))
        done = _lines(child, 1, window + warmup + 30)[0]
    finally:
        child.stop()
    rates = [count / done["seconds"] / 1000 for count in done["bytes"]]
    result["bulk_kb_s"] = round(sum(rates), 1)
    if connections > 1:
        mean = sum(rates) / len(rates)
        result["per_connection_kb_s"] = [round(rate, 1) for rate in rates]
        result["max_deviation_from_mean"] = round(max(abs(rate - mean) for rate in rates) / mean, 3) if mean else None
    if done["errors"]:
        result["errors"] = done["errors"]
    return result


class _DirectPair:
    """The apps themselves, no tunnel: the floor this machine sets for the same loads."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = {"ECHO": ports["echo"], "UP": ports["count"], "DOWN": ports["source"]}


def _direct(ports: dict[str, int], log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    print("... interactive direct (no proxy)", file=sys.stderr, flush=True)
    pair = _DirectPair(ports)
    row: dict[str, Any] = {"unloaded": latency_summary(*echo_probes(pair.ports["ECHO"], args.window))}
    for load in ("up", "down"):
        row[f"under_bulk_{load}"] = _with_bulk(pair, log_dir, f"direct-{load}", load, 1, args.warmup,  # type: ignore[arg-type]
                                               args.window, True)
    return row


def run_interactive(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"cap_bytes_per_s": args.cap, "warmup_s": args.warmup, "window_s": args.window}
    children: list[Child] = []
    try:
        apps, ports = start_apps(log_dir)
        children.append(apps)
        # The echo app in a process of its own: the bulk apps' hashing must not delay it.
        echo_apps, echo_ports = start_apps(log_dir)
        children.append(echo_apps)
        ports = {**ports, "echo": echo_ports["echo"]}
        links = []
        wanted = args.links.split(",")
        for label, cap in (("uncapped", None), ("capped", args.cap)):
            if label not in wanted:
                continue
            emulator, info = start_emulator(log_dir, False, cap, args.autotuned_buffers)
            children.append(emulator)
            links.append((label, info, ControlPlane(info)))
        settings = write_settings(log_dir / "settings.json", max_connections=128)
        results["direct"] = {"uncapped": _direct(ports, log_dir, args)}
        for name, source_template, destination_template in implementations(args):
            out: dict[str, Any] = results.setdefault(name, {})
            for label, info, control in links:
                print(f"... interactive {name} {label}", file=sys.stderr, flush=True)
                row: dict[str, Any] = {}
                loads = ["unloaded", "up", "down"] + (["four"] if label == "capped" else [])
                for load in loads:
                    # A fresh pair per load: a previous bulk connection's bytes still queued in
                    # the kernel would otherwise keep its direction busy for seconds.
                    tag = f"{name}-{label}-{load}".replace("+", "p")
                    try:
                        pair = start_pair(control, info, log_dir, tag, "ECHO", ports["echo"], settings,
                                          source_template, destination_template,
                                          more_services={"UP": ports["count"], "DOWN": ports["source"]})
                    except RigError as error:
                        row[load] = {"error": str(error)}
                        continue
                    try:
                        if load == "unloaded":
                            row[load] = latency_summary(*echo_probes(pair.ports["ECHO"], args.window))
                        elif load == "four":
                            row["four_bulk_down"] = _with_bulk(pair, log_dir, tag, "down", 4, args.warmup,
                                                               max(args.window, 10.0), False)
                        else:
                            row[f"under_bulk_{load}"] = _with_bulk(pair, log_dir, tag, load, 1, args.warmup,
                                                                   args.window, True)
                    except (RigError, OSError) as error:
                        row[load] = {"error": f"{type(error).__name__}: {error}"}
                    finally:
                        pair.stop()
                out[label] = row
    finally:
        for child in reversed(children):
            child.stop()
    return results


def print_interactive(results: dict[str, Any]) -> None:
    cap = results["cap_bytes_per_s"]
    print(f"interactive: 64 B echo every {PROBE_INTERVAL * 1000:.0f} ms for {results['window_s']} s after "
          f"{results['warmup_s']} s of bulk; capped = {cap / 1000:.0f} kB/s per direction")
    header = ("impl", "link", "load", "p50 ms", "p99 ms", "max ms", "lost", "bulk kB/s", "of cap")
    print("  ".join(f"{h:>10}" for h in header))
    for name, rows in results.items():
        if not isinstance(rows, dict) or name.endswith("_s"):
            continue
        for label, row in rows.items():
            for load in ("unloaded", "under_bulk_up", "under_bulk_down"):
                cell = row.get(load) or row.get(load.replace("under_bulk_", ""))
                if not cell:
                    continue
                if "error" in cell:
                    print(f"{name:>10}  {label:>10}  {load}: FAILED: {cell['error']}")
                    continue
                rate = cell.get("bulk_kb_s")
                share = f"{rate * 1000 / cap:.0%}" if rate is not None and label == "capped" else "-"
                values = (name, label, load.replace("under_bulk_", "bulk "), cell.get("p50_ms"), cell.get("p99_ms"),
                          cell.get("max_ms"), cell.get("timeouts"), rate if rate is not None else "-", share)
                print("  ".join(f"{str(v):>10}" for v in values))
            fair = row.get("four_bulk_down")
            if fair:
                print(f"{name:>10}  {label:>10}  four downloads kB/s {fair.get('per_connection_kb_s')} "
                      f"(total {fair.get('bulk_kb_s')}, max deviation from mean {fair.get('max_deviation_from_mean')})")
            if "four" in row:
                print(f"{name:>10}  {label:>10}  four downloads: FAILED: {row['four']['error']}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["bulk"]:
        sys.exit("usage: _interactive.py bulk --direction up|down --port P [--connections N] --warmup S --window S")
    sys.exit(bulk_main(sys.argv[2:]))
