"""The tunnel benchmark's table: ours, the no-proxy baseline, the ratio, the C++ reference."""

from __future__ import annotations

import math
from typing import Any

Row = tuple[str, str, str, str, str]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(ours: Any, base: Any) -> str:
    """ours / baseline: the fraction of the baseline's throughput, or times its latency."""
    try:
        ours, base = float(ours), float(base)
    except (TypeError, ValueError):
        return "-"
    if ours <= 0 or base <= 0 or math.isnan(ours) or math.isnan(base):
        return "-"
    return f"{ours / base:.2f}x"


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for direction, label in (("up", "source -> destination"), ("down", "destination -> source")):
        bulk = results.get(f"bulk_{direction}")
        if not bulk:
            continue
        if "error" in bulk and "mb_s" not in bulk:
            out.append((f"bulk {label}", "FAILED", "-", "-", "-"))
            continue
        intact = "" if bulk["intact"] else " CORRUPT/FAILED"
        out.append((f"bulk {label}, MB/s ({bulk['size_mib']} MiB){intact}", _fmt(bulk["mb_s"]),
                    _fmt(bulk["baseline_mb_s"]), _ratio(bulk["mb_s"], bulk["baseline_mb_s"]), "140"))
        cpu = bulk["cpu_s_per_gib"]
        out.append(("  CPU-s/GiB sending proxy", _fmt(cpu["sending_proxy"], 2), "", "", "2.5"))
        out.append(("  CPU-s/GiB receiving proxy", _fmt(cpu["receiving_proxy"], 2), "", "", "1.3"))
        out.append(("  CPU-s/GiB emulator (relay)", _fmt(cpu["emulator"], 2), "", "", "-"))
        rss = bulk["peak_rss_mib"]
        out.append(("  peak RSS source / destination, MiB", f"{_fmt(rss['source'])} / {_fmt(rss['destination'])}",
                    "", "", "-"))
    echo = results.get("echo_64b")
    if echo and "p50_us" in echo:
        out.append(("echo 64 B p50, us", _fmt(echo["p50_us"]), _fmt(echo["baseline_p50_us"]),
                    _ratio(echo["p50_us"], echo["baseline_p50_us"]), "470"))
        out.append(("echo 64 B p99, us", _fmt(echo["p99_us"]), _fmt(echo["baseline_p99_us"]),
                    _ratio(echo["p99_us"], echo["baseline_p99_us"]), "-"))
    connect = results.get("new_connection")
    if connect and "p50_ms" in connect:
        failed = f" ({connect['failed']} failed)" if connect["failed"] else ""
        out.append((f"new connection -> first reply p50, ms{failed}", _fmt(connect["p50_ms"], 2),
                    _fmt(connect["baseline_p50_ms"], 3), _ratio(connect["p50_ms"], connect["baseline_p50_ms"]),
                    "~45"))
        out.append(("new connection -> first reply p99, ms", _fmt(connect["p99_ms"], 2),
                    _fmt(connect["baseline_p99_ms"], 3), _ratio(connect["p99_ms"], connect["baseline_p99_ms"]),
                    "-"))
    for key in sorted(k for k in results if k.startswith("concurrent_")):
        conc = results[key]
        if "succeeded" not in conc:
            out.append((f"{key}", "FAILED", "-", "-", "-"))
            continue
        n = conc["connections"]
        reference = "loses some of 50" if n >= 50 else "-"
        out.append((f"{n} simultaneous: succeeded", f"{conc['succeeded']}/{n}", f"{conc['baseline_succeeded']}/{n}",
                    "", reference))
        out.append((f"  {n} x {conc['per_connection_kib']} KiB echo, aggregate MB/s", _fmt(conc["mb_s"]),
                    _fmt(conc["baseline_mb_s"]), _ratio(conc["mb_s"], conc["baseline_mb_s"]), "-"))
        out.append(("  time to first byte p50 / p99, ms",
                    f"{_fmt(conc['first_byte_p50_ms'], 2)} / {_fmt(conc['first_byte_p99_ms'], 2)}",
                    _fmt(conc["baseline_first_byte_p50_ms"], 2), "", "-"))
    slow = results.get("slow_reader")
    if slow and "peak_rss_mib" in slow:
        rss = slow["peak_rss_mib"]
        intact = "" if slow["intact"] else " CORRUPT/FAILED"
        out.append((f"slow reader {slow['size_mib']} MiB at {slow['reader_mib_s']} MiB/s: peak RSS src/dst MiB{intact}",
                    f"{_fmt(rss['source'])} / {_fmt(rss['destination'])}", "", "", "250"))
    return out


def print_table(results: dict[str, Any]) -> None:
    header: Row = ("figure", "ours", "no proxy", "vs base", "C++ ref")
    table = [header] + rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    machine = results.get("machine", {})
    print(f"tunnel benchmark: {'wss' if machine.get('tls') else 'ws'}, {machine.get('cpus')} CPUs, "
          f"python {machine.get('python')}, {results.get('seconds')} s")
    for index, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                for i, cell in enumerate(row)) + " |")
        if index == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for key, value in results.items():
        if isinstance(value, dict) and value.get("error") and "intact" not in value:
            print(f"{key}: {value['error']}")
    print("vs base: ours / no-proxy baseline (times slower for latency, fraction for throughput).")
