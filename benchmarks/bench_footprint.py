"""Footprint of a proxy on a small device: startup, idle memory, idle wakeups, many tunnels.

Run: ``python benchmarks/bench_footprint.py [--quick] [--starts N] [--tunnels N] [--json FILE]``.

Against the emulator (``python -m localproxy.emulator``, a separate process), and,
when ``../shared/reference/localproxy-nossl`` exists, the C++ reference binary in
the same run, from the rig's command templates (``_rig.py``; ``--source-template``
etc. measure another binary):

- startup: process start -> its "Listening for new connection" line (a source
  proxy on a fresh tunnel: it connects, gets SERVICE_IDS, listens); median and
  min of ``--starts`` runs, ours and the reference alternating;
- idle RSS (VmRSS) and USS (its private pages: RSS less the shared libraries'
  pages, what each more process costs) of a connected source and destination
  proxy process after ``--settle`` seconds, and its wakeups per second over ``--window`` seconds
  (voluntary + involuntary context switches of all its threads, from /proc);
  the ping period (20 s by default) needs 0.05/s;
- library: ``--tunnels`` tunnels in one process (a child running only
  ``localproxy``), a source and a destination ``LocalProxy`` for each, all
  connected through the emulator: RSS after the first pair and after all, and
  KiB per ``LocalProxy`` beyond the first pair;
- the floor: ``python -c "import asyncio"`` (spawn to exit, and its RSS), which
  any asyncio proxy pays before its own code, measured between the proxies' starts
  (the same load); printed as ratios: startup / the floor's (target <= 1.5x) and
  idle RSS - the floor's (target <= + 5 MiB).

All on loopback; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _rig  # noqa: E402
from _rig import (  # noqa: E402
    ROOT,
    ControlPlane,
    EmulatorInfo,
    RigError,
    free_port,
    memory_kib,
    start_emulator,
    start_pair,
    write_settings,
)

READY_LINE = b"Listening for new connection"
ASYNCIO = "LOCALPROXY_EVENT_LOOP=asyncio "  # a plain install: no uvloop
UVLOOP = "LOCALPROXY_EVENT_LOOP=uvloop "  # with localproxy[uvloop]


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
SERVICE = "BENCH"


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread ended
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def private_mib(pid: int) -> float:
    """Unique set size (private pages: what this process alone costs), from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return round((fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024, 1)


def child_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    for proxy_var in ("HTTPS_PROXY", "https_proxy"):
        env.pop(proxy_var, None)
    return {**env, "AWSIOT_TUNNEL_ACCESS_TOKEN": token}


def startup_ms(control: ControlPlane, info: EmulatorInfo, template: str, settings: Path, timeout: float) -> float:
    """Milliseconds from spawning a source proxy to its "Listening for new connection" line."""
    tunnel = control.open_tunnel(SERVICE)
    port = free_port()
    argv, env = _rig.command_line(template, {
        "python": sys.executable, "endpoint": info.data, "host_port": info.data.split("://", 1)[1],
        "service": SERVICE, "port": str(port), "source_map": f"{SERVICE}={port}", "capath_args": "",
        "settings": str(settings), "app_host": "127.0.0.1", "app_port": "9",
        "destination_map": f"{SERVICE}=127.0.0.1:9"})
    began = time.perf_counter()
    process = subprocess.Popen(argv, cwd=str(ROOT), env={**child_env(tunnel["sourceAccessToken"]), **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    seen = b""
    try:
        deadline = began + timeout
        while READY_LINE not in seen:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
                raise RigError(f"no {READY_LINE.decode()!r} within {timeout} s from {argv[0]}")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise RigError(f"{argv[0]} exited with {process.wait()}:\n{seen.decode(errors='replace')[-2000:]}")
            seen += chunk
        return (time.perf_counter() - began) * 1000
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        control.close_tunnel(tunnel["tunnelId"])


def idle_figures(control: ControlPlane, info: EmulatorInfo, log_dir: Path, tag: str, templates: tuple[str, str],
                 settings: Path, args: argparse.Namespace) -> dict[str, Any]:
    """RSS and wakeups/s of a connected, idle source and destination proxy process."""
    source_template, destination_template = templates
    pair = start_pair(control, info, log_dir, tag, SERVICE, 9, settings, source_template, destination_template,
                      timeout=30)
    try:
        time.sleep(args.settle)  # idle on purpose: nothing to wait for but time
        pids = {"source": pair.source.pid, "destination": pair.destination.pid}
        before = {name: context_switches(pid) for name, pid in pids.items()}
        began = time.monotonic()
        time.sleep(args.window)
        seconds = time.monotonic() - began
        after = {name: context_switches(pid) for name, pid in pids.items()}
        alive = all(child.alive() for child in pair.children)
        return {
            "alive": alive,
            **{f"{name}_rss_mib": round(memory_kib(pid, "VmRSS") / 1024, 1) for name, pid in pids.items()},
            **{f"{name}_uss_mib": private_mib(pid) for name, pid in pids.items()},
            **{f"{name}_wakeups_per_s": round((after[name] - before[name]) / seconds, 2) for name in pids},
        }
    finally:
        pair.stop()


# --- many tunnels in one process (runs in a child: only localproxy imported) ------------


async def _many(data_url: str, tokens: list[tuple[str, str]], app_port: int, timeout: float) -> dict[str, Any]:
    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort

    endpoint = ServiceEndpoint.parse(data_url)
    proxies: list[LocalProxy] = []
    rss: list[int] = []

    async def add(source_token: str, destination_token: str) -> None:
        destination = LocalProxy(ProxyConfig(mode=Mode.DESTINATION, access_token=destination_token, endpoint=endpoint,
                                             services={SERVICE: DestinationTarget("127.0.0.1", app_port)}))
        source = LocalProxy(ProxyConfig(mode=Mode.SOURCE, access_token=source_token, endpoint=endpoint,
                                        services={SERVICE: SourcePort(0)}))
        for proxy in (destination, source):
            proxy.start()
            proxies.append(proxy)
        async with asyncio.timeout(timeout):
            await asyncio.gather(destination.ready, source.ready)

    try:
        await add(*tokens[0])
        await asyncio.sleep(0.5)  # let the first pair's lazy allocations happen
        rss.append(memory_kib(os.getpid(), "VmRSS"))
        for batch in range(1, len(tokens), 20):
            await asyncio.gather(*(add(*pair) for pair in tokens[batch:batch + 20]))
        await asyncio.sleep(0.5)
        rss.append(memory_kib(os.getpid(), "VmRSS"))
        tasks = len(asyncio.all_tasks())
    finally:
        await asyncio.gather(*(proxy.close() for proxy in proxies), return_exceptions=True)
    return {"first_pair_rss_kib": rss[0], "all_rss_kib": rss[1], "tasks": tasks}


def many_child() -> int:
    request = json.loads(sys.stdin.readline())
    from localproxy.ops.runtime import run_program

    result = run_program(_many(request["data"], [tuple(t) for t in request["tokens"]], request["app_port"],
                               request["timeout"]))
    print(json.dumps(result), flush=True)
    return 0


FLOOR_PROGRAM = "import asyncio; print(open('/proc/self/status').read())"


def floor_start() -> tuple[float, int]:
    """One ``python -c "import asyncio"``: spawn-to-exit ms and its RSS (KiB) at the end."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FLOOR_PROGRAM], capture_output=True, text=True, timeout=30)
    elapsed = (time.perf_counter() - began) * 1000
    rss_kib = next((int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("VmRSS:")), 0)
    return elapsed, rss_kib


def floor_figures(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """What ``python -c "import asyncio"`` alone costs here (measured between the proxies' starts)."""
    times = [ms for ms, _ in samples]
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "rss_mib": round(statistics.median(kib for _, kib in samples) / 1024, 1), "samples": len(samples)}


def many_tunnels(control: ControlPlane, info: EmulatorInfo, count: int, timeout: float, root: Path) -> dict[str, Any]:
    tunnels = [control.open_tunnel(SERVICE) for _ in range(count)]
    request = {"data": info.data, "app_port": 9, "timeout": timeout,
               "tokens": [(t["sourceAccessToken"], t["destinationAccessToken"]) for t in tunnels]}
    try:
        done = subprocess.run([sys.executable, __file__, "--many-child"], input=json.dumps(request) + "\n",
                              capture_output=True, text=True, timeout=timeout * 3, cwd=str(root),
                              env={**os.environ, "PYTHONPATH": str(root.resolve())})
    finally:
        for tunnel in tunnels:
            control.close_tunnel(tunnel["tunnelId"])
    if done.returncode != 0:
        raise RigError(f"the many-tunnels child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    extra = 2 * (count - 1)
    result["tunnels"] = count
    result["kib_per_local_proxy_beyond_first"] = round((result["all_rss_kib"] - result["first_pair_rss_kib"]) /
                                                       max(1, extra), 1)
    return result


def compile_bytecode(root: Path) -> None:
    """Write the package's ``.pyc`` files, as ``pip install`` does for an installed package.

    Without them (a checkout under ``PYTHONDONTWRITEBYTECODE=1``, as on CI machines) every
    start compiles ~60 modules from source: ~+50% start-up and ~+1 MiB, which no user pays,
    while the floor's standard library is compiled. ``__pycache__`` is ignored by git.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", "localproxy"], cwd=str(root), check=True, timeout=120,
                   stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 starts, 3 s window, 20 tunnels")
    parser.add_argument("--starts", type=int, help="process starts per binary (default 11, quick 5)")
    parser.add_argument("--window", type=float, help="seconds of idle wakeup counting (default 20, quick 3)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before measuring RSS")
    parser.add_argument("--tunnels", type=int, help="tunnels in one process (default 100, quick 20)")
    parser.add_argument("--source-template", default=_rig.OURS_SOURCE)
    parser.add_argument("--destination-template", default=_rig.OURS_DESTINATION)
    parser.add_argument("--baseline-root", type=Path, help="also measure the proxy of another checkout "
                        "(e.g. a worktree of main) in the same run, as 'base'")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--startup-only", action="store_true", help="startup and the floor only (no idle, no many)")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not write the package's .pyc files first (measure compiling from source too)")
    parser.add_argument("--many-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.many_child:
        return many_child()
    args.starts = args.starts or (5 if args.quick else 11)
    args.window = args.window or (3.0 if args.quick else 20.0)
    args.tunnels = args.tunnels or (20 if args.quick else 100)
    has_reference = _rig.REFERENCE_BINARY.exists()
    if not args.no_compile:
        for root in (ROOT, args.baseline_root):
            if root is not None:
                compile_bytecode(root)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as temp:
        log_dir = Path(temp)
        settings = write_settings(log_dir / "settings.json", max_connections=128)
        emulator, info = start_emulator(log_dir, tls=False)
        try:
            control = ControlPlane(info)
            # "ours": as a plain install runs (asyncio's loop); "ours+uv": with the uvloop extra.
            binaries = {"ours": (ASYNCIO + args.source_template, ASYNCIO + args.destination_template)}
            if has_uvloop():
                binaries["ours+uv"] = (UVLOOP + args.source_template, UVLOOP + args.destination_template)
            if args.baseline_root:
                chdir = f"env -C {shlex.quote(str(args.baseline_root.resolve()))} "
                binaries["base"] = (chdir + _rig.OURS_SOURCE, chdir + _rig.OURS_DESTINATION)
            if has_reference:
                binaries["cpp"] = (_rig.REFERENCE_SOURCE, _rig.REFERENCE_DESTINATION)
            print("... startup", file=sys.stderr, flush=True)
            times: dict[str, list[float]] = {name: [] for name in binaries}
            floor: list[tuple[float, int]] = []
            for _ in range(args.starts):  # the floor interleaved with the proxies: the same machine load
                floor.append(floor_start())
                for name, (source_template, _destination) in binaries.items():
                    times[name].append(startup_ms(control, info, source_template, settings, 30))
            results["floor"] = floor_figures(floor)
            for name, samples in times.items():
                results[f"startup_{name}"] = {"median_ms": round(statistics.median(samples), 1),
                                              "min_ms": round(min(samples), 1), "samples": len(samples)}
            for name, templates in ({} if args.startup_only else binaries).items():
                print(f"... idle {name}", file=sys.stderr, flush=True)
                results[f"idle_{name}"] = idle_figures(control, info, log_dir, f"idle-{name}", templates, settings,
                                                       args)
            if not args.startup_only:
                print(f"... {args.tunnels} tunnels in one process", file=sys.stderr, flush=True)
                results["many_tunnels_ours"] = many_tunnels(control, info, args.tunnels, 60, ROOT)
            if args.baseline_root and not args.startup_only:
                results["many_tunnels_base"] = many_tunnels(control, info, args.tunnels, 60, args.baseline_root)
        finally:
            emulator.stop()
    results["bytecode"] = "as found" if args.no_compile else "compiled first"
    print_results(results, list(binaries))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_results(results: dict[str, Any], names: list[str]) -> None:
    """One column per binary; "x C++" is ours / the reference where it ran."""
    rows = [("startup median, ms", "startup", "median_ms"), ("startup min, ms", "startup", "min_ms"),
            ("idle RSS source, MiB", "idle", "source_rss_mib"),
            ("idle RSS destination, MiB", "idle", "destination_rss_mib"),
            ("idle USS (private) source, MiB", "idle", "source_uss_mib"),
            ("idle USS destination, MiB", "idle", "destination_uss_mib"),
            ("idle wakeups/s source", "idle", "source_wakeups_per_s"),
            ("idle wakeups/s destination", "idle", "destination_wakeups_per_s")]
    print(f"{'figure':32}" + "".join(f"{name:>10}" for name in names) + ("  ours/C++" if "cpp" in names else ""))
    for label, key, field in rows:
        values = {name: results.get(f"{key}_{name}", {}).get(field) for name in names}
        line = f"{label:32}" + "".join(f"{values[name]!s:>10}" for name in names)
        if values.get("cpp"):
            line += f"  {values['ours'] / values['cpp']:8.2f}x"
        print(line)
    floor = results["floor"]
    print(f"package bytecode: {results['bytecode']} (--no-compile: as found)")
    print(f"floor: python -c 'import asyncio' spawn to exit {floor['median_ms']} ms median, {floor['min_ms']} ms min "
          f"({floor['samples']} runs, between the proxies' starts), RSS {floor['rss_mib']} MiB")
    for name in names:
        if name == "cpp":
            continue
        start = results.get(f"startup_{name}", {})
        idle = results.get(f"idle_{name}", {})
        line = f"{name} vs the floor: startup {start.get('median_ms', 0) / floor['median_ms']:.2f}x (median), " \
               f"{start.get('min_ms', 0) / floor['min_ms']:.2f}x (min); target <= 1.50x"
        if idle:
            line += (f"; idle RSS floor + {idle['source_rss_mib'] - floor['rss_mib']:.1f} MiB source, "
                     f"+ {idle['destination_rss_mib'] - floor['rss_mib']:.1f} MiB destination; target <= + 5.0 MiB")
        print(line)
    for name in names:
        many = results.get(f"many_tunnels_{name}")
        if many:
            print(f"{name}: {many['tunnels']} tunnels in one process ({2 * many['tunnels']} LocalProxy): first pair "
                  f"{many['first_pair_rss_kib'] / 1024:.1f} MiB, all {many['all_rss_kib'] / 1024:.1f} MiB, "
                  f"{many['kib_per_local_proxy_beyond_first']} KiB per LocalProxy beyond the first pair, "
                  f"{many['tasks']} tasks")


if __name__ == "__main__":
    sys.exit(main())
