"""The benchmark rig: child processes (emulator, apps, proxies from command templates),
their CPU and memory from /proc, and the emulator's control API through boto3.

Everything here is bounded: each wait has a deadline, each child is killed at exit.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Our proxy, as the rig runs it by default. Placeholders: {python}, {endpoint}
# (ws(s)://host:port), {host_port}, {service}, {app_host}, {app_port}, {port} (the
# first service's), {source_map} ("SVC=port,..."), {destination_map}
# ("SVC=host:port,..."), {capath_args} ("-c DIR" with --tls, else empty), {settings}
# (a settings JSON file).
OURS_DESTINATION = "{python} -m localproxy -e {endpoint} {capath_args} --settings-json {settings} -d {destination_map}"
OURS_SOURCE = "{python} -m localproxy -e {endpoint} {capath_args} --settings-json {settings} -b 127.0.0.1 -s {source_map}"
# The C++ reference (plain-ws build), for the same rig: ../shared/reference/README.md.
REFERENCE_BINARY = ROOT.parent / "shared" / "reference" / "localproxy-nossl"
REFERENCE_DESTINATION = f"{REFERENCE_BINARY} -e {{host_port}} --settings-json {{settings}} -d {{destination_map}}"
REFERENCE_SOURCE = f"{REFERENCE_BINARY} -e {{host_port}} --settings-json {{settings}} -b 127.0.0.1 -s {{source_map}}"


class RigError(RuntimeError):
    """The rig could not set something up (a child died, a deadline passed)."""


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RigError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- /proc ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of ``pid`` in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0; needs ptrace rights on pid)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this host (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- children ------------------------------------------------------------------------


class Child:
    """A child process logging to a file (stdout too, unless it prints a JSON line there)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 stdin_pipe: bool = False, json_stdout: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        # Only a child that prints its JSON line keeps stdout as a pipe; the proxies log there.
        self.process = subprocess.Popen(
            argv, cwd=str(ROOT), env=env, stdout=subprocess.PIPE if json_stdout else self._log, stderr=self._log,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_json_line(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        os.set_blocking(fd, False)
        buffer = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buffer:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"{self.name} gave no JSON line; its log:\n{self.log_tail()}")
            try:
                buffer += os.read(fd, 4096) or b""
            except BlockingIOError:
                time.sleep(0.01)
        result: dict[str, Any] = json.loads(buffer.split(b"\n", 1)[0])
        return result

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10, signal_number: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.send_signal(signal_number)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log.close()
        return int(self.process.returncode)


@dataclass
class EmulatorInfo:
    api: str
    data: str
    ca: str | None
    capath: str | None


def start_emulator(log_dir: Path, tls: bool, bandwidth: float | None = None,
                   autotuned_buffers: bool = False) -> tuple[Child, EmulatorInfo]:
    argv = [sys.executable, "-m", "localproxy.emulator", "--port", "0", "-v", "3"]
    if autotuned_buffers:
        argv.append("--autotuned-buffers")
    if tls:
        argv += ["--tls", "--ca-out", str(log_dir / "ca")]
    if bandwidth:
        argv += ["--bandwidth", str(bandwidth)]
    child = Child("emulator" if not bandwidth else "emulator-capped", argv, log_dir, json_stdout=True)
    line = child.read_json_line(30)
    return child, EmulatorInfo(line["api"], line["data"], line.get("ca"), line.get("capath"))


def start_apps(log_dir: Path) -> tuple[Child, dict[str, int]]:
    child = Child("apps", [sys.executable, str(Path(__file__).with_name("_apps.py"))], log_dir, stdin_pipe=True,
                  json_stdout=True)
    return child, {k: int(v) for k, v in child.read_json_line(30).items()}


def start_py_spy(pid: int, output: Path, log_dir: Path) -> Child:
    """Sample ``pid`` with py-spy (``pip install py-spy``) until stopped with SIGINT."""
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
            "--output", str(output)]
    return Child(f"py-spy-{output.stem}", argv, log_dir)


class ControlPlane:
    """OpenTunnel / DescribeTunnel through boto3 against the emulator."""

    def __init__(self, info: EmulatorInfo) -> None:
        import boto3

        self.client = boto3.client(
            "iotsecuretunneling", region_name="us-east-1", endpoint_url=info.api,
            aws_access_key_id="AKIDBENCHMARK", aws_secret_access_key="benchmark-secret",
            verify=info.ca if info.ca else True,
        )

    def open_tunnel(self, *services: str) -> dict[str, str]:
        result: dict[str, str] = self.client.open_tunnel(destinationConfig={"services": list(services)})
        return result

    def connected(self, tunnel_id: str) -> bool:
        tunnel = self.client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        return all(tunnel[f"{side}ConnectionState"]["status"] == "CONNECTED" for side in ("source", "destination"))

    def close_tunnel(self, tunnel_id: str) -> None:
        self.client.close_tunnel(tunnelId=tunnel_id)


@dataclass
class ProxyPair:
    source: Child
    destination: Child
    port: int  # the source proxy's listening port (of the first service)
    tunnel_id: str
    ports: dict[str, int] = field(default_factory=dict)  # service -> the source proxy's port

    @property
    def children(self) -> list[Child]:
        return [self.source, self.destination]

    def stop(self) -> dict[str, int]:
        return {child.name: child.stop() for child in self.children}


def command_line(template: str, values: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A command template filled in: its argv, and the ``NAME=value`` words it starts with
    (as in a shell: ``LOCALPROXY_EVENT_LOOP=uvloop {python} -m localproxy ...``) as environment."""
    words = shlex.split(template.format(**values))
    env: dict[str, str] = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return words, env


def start_pair(
    control: ControlPlane,
    info: EmulatorInfo,
    log_dir: Path,
    tag: str,
    service: str,
    app_port: int,
    settings_path: Path,
    source_template: str = OURS_SOURCE,
    destination_template: str = OURS_DESTINATION,
    timeout: float = 30,
    more_services: dict[str, int] | None = None,
) -> ProxyPair:
    """Open a tunnel, start both proxies from their templates, wait until they serve.

    ``service`` -> ``app_port``, plus ``more_services`` (service -> app port) on the same tunnel.
    """
    apps = {service: app_port, **(more_services or {})}
    tunnel = control.open_tunnel(*apps)
    ports = {name: free_port() for name in apps}
    port = ports[service]
    values = {
        "python": sys.executable,
        "endpoint": info.data,
        "host_port": info.data.split("://", 1)[1],
        "service": service,
        "app_host": "127.0.0.1",
        "app_port": str(app_port),
        "port": str(port),
        "source_map": ",".join(f"{name}={ports[name]}" for name in apps),
        "destination_map": ",".join(f"{name}=127.0.0.1:{apps[name]}" for name in apps),
        "capath_args": f"-c {shlex.quote(info.capath)}" if info.capath else "",
        "settings": str(settings_path),
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    for proxy_var in ("HTTPS_PROXY", "https_proxy"):
        base_env.pop(proxy_var, None)

    def launch(name: str, template: str, token: str) -> Child:
        argv, env = command_line(template, values)
        return Child(f"{tag}-{name}", argv, log_dir, env={**base_env, **env, "AWSIOT_TUNNEL_ACCESS_TOKEN": token})

    destination = launch("destination", destination_template, tunnel["destinationAccessToken"])
    source = launch("source", source_template, tunnel["sourceAccessToken"])
    pair = ProxyPair(source, destination, port, tunnel["tunnelId"], ports)

    def ready() -> bool:
        for child in pair.children:
            if not child.alive():
                raise RigError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        return set(ports.values()) <= listening_ports() and control.connected(tunnel["tunnelId"])

    try:
        wait_until(ready, timeout, f"{tag} proxies to connect and listen", interval=0.05)
    except BaseException:
        pair.stop()
        raise
    return pair


def write_settings(path: Path, max_connections: int) -> Path:
    """A settings JSON raising tcp.max_active_connections for the concurrency scenarios."""
    tree = {"tunneling": {"proxy": {"tcp": {"max_active_connections": str(max_connections)}}}}
    path.write_text(json.dumps(tree))
    return path
