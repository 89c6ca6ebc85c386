"""Source listeners on Unix sockets (``-s SSH=/path/to.sock``), with real sockets.

Checked: mode 0600 (and another user refused, when the tests run as root), the
parent directory (missing, world-writable without sticky bit, another user's),
an existing live socket (error), a stale one (replaced), a non-socket file (error,
untouched), removal on exit, and the drop-in CLI end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from localproxy import (
    ConfigError,
    DestinationTarget,
    Listening,
    LocalProxy,
    Mode,
    ProxyConfig,
    ServiceEndpoint,
    SourceUnixSocket,
)
from localproxy.config.mappings import parse_mapping
from localproxy.errors import ExitCode
from localproxy.local.unix import listen_unix
from localproxy.settings import Settings
from localproxy.testing.processes import echo

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")

TIMEOUT = 15.0
FAST = Settings(retry_delay_ms=50, tcp_connection_retry_count=1, tcp_connection_retry_delay_ms=50)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (pytest's tmp_path can exceed a socket address)."""
    path = Path(tempfile.mkdtemp(prefix="lpu"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def listen_here(path: Path) -> Any:
    return await listen_unix("SSH", str(path), asyncio.Protocol)


# --- the listener's checks ---------------------------------------------------------------------


async def test_socket_is_0600_served_and_removed_on_close(short_dir: Path) -> None:
    path = short_dir / "ssh.sock"
    umask = os.umask(0o022)
    os.umask(umask)
    listener = await listen_here(path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(short_dir) == ["ssh.sock"]  # the staging directory is gone
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), TIMEOUT)
        writer.close()
    finally:
        listener.close()
    assert not path.exists()
    assert os.umask(umask) == umask  # the process umask was left alone


async def test_long_directory_binds_under_a_umask_and_too_long_is_an_error(short_dir: Path) -> None:
    from localproxy.local.unix import MAX_PATH_BYTES

    # The staging path (14 bytes longer) would not fit in a socket address; the final one does.
    deep = short_dir / ("d" * (MAX_PATH_BYTES - len(str(short_dir)) - 6))
    deep.mkdir(mode=0o700)
    path = deep / "s"
    assert len(str(path)) <= MAX_PATH_BYTES < len(str(path)) + 12
    umask = os.umask(0o022)
    try:
        listener = await listen_here(path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        listener.close()
        assert os.umask(0o022) == 0o022  # restored after the bind
    finally:
        os.umask(umask)
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        await listen_here(deep / ("x" * 20))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as another user")
async def test_another_user_cannot_connect(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)  # the directory lets them in; the socket's 0600 does not
    path = short_dir / "ssh.sock"
    listener = await listen_here(path)
    try:
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(13)\n"
        )
        # A Python that user 65534 may run (a root-only virtualenv's may not be).
        python = next((p for p in (sys.executable, "/usr/bin/python3") if _runs_as_nobody(p)), None)
        if python is None:
            pytest.skip("no Python interpreter that user 65534 may run")
        result = await asyncio.to_thread(
            subprocess.run, [python, "-c", probe, str(path)], user=65534, timeout=TIMEOUT, check=False
        )
        assert result.returncode == 13
    finally:
        listener.close()


def _runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", ""], user=65534, timeout=TIMEOUT, check=False).returncode == 0
    except OSError:
        return False


async def test_missing_directory(short_dir: Path) -> None:
    path = short_dir / "nope" / "ssh.sock"
    with pytest.raises(ConfigError, match=r"the directory .*nope does not exist"):
        await listen_here(path)


async def test_world_writable_directory_without_sticky_bit(short_dir: Path) -> None:
    os.chmod(short_dir, 0o777)
    with pytest.raises(ConfigError, match=r"writable by every user \(mode 0777, no sticky bit\)"):
        await listen_here(short_dir / "ssh.sock")
    assert os.listdir(short_dir) == []
    os.chmod(short_dir, 0o1777)  # as /tmp: sticky, so others cannot remove our files
    listener = await listen_here(short_dir / "ssh.sock")
    listener.close()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
async def test_directory_of_another_user(short_dir: Path) -> None:
    os.chown(short_dir, 65534, -1)
    with pytest.raises(ConfigError, match="belongs to another user"):
        await listen_here(short_dir / "ssh.sock")


async def test_live_socket_is_an_error(short_dir: Path) -> None:
    path = short_dir / "ssh.sock"
    other = await asyncio.start_unix_server(lambda r, w: w.close(), str(path))
    try:
        with pytest.raises(ConfigError, match="another process is listening on it"):
            await listen_here(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # theirs, untouched
    finally:
        other.close()


async def test_stale_socket_is_replaced(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = short_dir / "ssh.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening, then closed: what a killed proxy leaves
    dead.close()
    stale_inode = os.lstat(path).st_ino
    with caplog.at_level("INFO", logger="localproxy"):
        listener = await listen_here(path)
    try:
        assert os.lstat(path).st_ino != stale_inode
        assert "Replacing the stale Unix socket" in caplog.text
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), TIMEOUT)
        writer.close()
    finally:
        listener.close()


async def test_a_file_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "ssh.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await listen_here(path)
    assert path.read_text() == "precious"


async def test_close_leaves_a_socket_that_replaced_ours(short_dir: Path) -> None:
    path = short_dir / "ssh.sock"
    listener = await listen_here(path)
    os.unlink(path)
    theirs = await asyncio.start_unix_server(lambda r, w: w.close(), str(path))
    try:
        listener.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        theirs.close()


def test_mapping_with_a_slash_is_a_unix_socket() -> None:
    services, _ = parse_mapping("SSH=/run/user/1000/ssh.sock,WEB=8080", Mode.SOURCE, "-s")
    assert services["SSH"] == SourceUnixSocket("/run/user/1000/ssh.sock")
    assert parse_mapping("./ssh.sock", Mode.SOURCE, "-s")[0] == {"": SourceUnixSocket("./ssh.sock")}


# --- through the proxy ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_destination(emulator: Any) -> AsyncIterator[Any]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    tunnel = emulator.open_tunnel(services=["SSH"])
    config = ProxyConfig(
        Mode.DESTINATION, tunnel.destination_token, ServiceEndpoint.parse(emulator.data_url),
        services={"SSH": DestinationTarget("127.0.0.1", server.sockets[0].getsockname()[1])}, settings=FAST,
    )  # fmt: skip
    try:
        async with LocalProxy(config):
            await emulator.wait_connected(tunnel.tunnel_id, "destination", TIMEOUT)
            yield tunnel
    finally:
        server.close()


async def test_proxy_serves_a_unix_socket_source(tunneling_service: Any, short_dir: Path) -> None:
    path = str(short_dir / "ssh.sock")
    events: list[object] = []
    async with echo_destination(tunneling_service) as tunnel:
        config = ProxyConfig(
            Mode.SOURCE, tunnel.source_token, ServiceEndpoint.parse(tunneling_service.data_url),
            services={"SSH": SourceUnixSocket(path)}, settings=FAST,
        )  # fmt: skip
        proxy = LocalProxy(config)
        proxy.subscribe(events.append)
        async with proxy:
            await asyncio.wait_for(proxy.ready, TIMEOUT)
            assert proxy.socket_paths == {"SSH": path} and proxy.ports == {}
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"over a unix socket")
            assert await asyncio.wait_for(reader.readexactly(18), TIMEOUT) == b"over a unix socket"
            writer.close()
        assert not os.path.exists(path)  # removed when the proxy closed
    assert Listening("SSH", 0, path) in events


async def test_proxy_with_a_missing_directory_stops_with_config_error(tunneling_service: Any, short_dir: Path) -> None:
    async with echo_destination(tunneling_service) as tunnel:
        config = ProxyConfig(
            Mode.SOURCE, tunnel.source_token, ServiceEndpoint.parse(tunneling_service.data_url),
            services={"SSH": SourceUnixSocket(str(short_dir / "missing" / "s"))}, settings=FAST,
        )  # fmt: skip
        async with LocalProxy(config) as proxy:
            with pytest.raises(ConfigError, match="does not exist"):
                await asyncio.wait_for(proxy.wait_closed(), TIMEOUT)


async def start_cli(emulator: Any, token: str, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy", "-e", emulator.data_url, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip


async def test_cli_unix_socket_source_end_to_end(tunneling_service: Any, short_dir: Path) -> None:
    path = str(short_dir / "ssh.sock")
    async with echo_destination(tunneling_service) as tunnel:
        process = await start_cli(tunneling_service, tunnel.source_token, "-s", f"SSH={path}")
        try:
            assert process.stdout is not None
            for _ in range(50):  # bounded: the listening line comes within the first lines
                line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
                assert line, "the proxy exited before listening"
                if b"Listening for new connection on Unix socket " + path.encode() in line:
                    break
            else:
                pytest.fail("no listening line")
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
            writer.close()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), TIMEOUT) == ExitCode.OK
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert not os.path.exists(path)


@pytest.mark.parametrize("case", ["missing", "world-writable"])
async def test_cli_bad_directory_is_refused_before_connecting(short_dir: Path, case: str) -> None:
    """Checked with the command line: message on stderr, exit 2, no connection attempted."""
    if case == "missing":
        path, needle = short_dir / "missing" / "ssh.sock", "does not exist"
    else:
        os.chmod(short_dir, 0o777)
        path, needle = short_dir / "ssh.sock", "writable by every user"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy", "-t", "token", "-e", "127.0.0.1:9", "-s", f"SSH={path}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = err.decode()
    assert process.returncode == ExitCode.CONFIG, text
    assert out == b""  # not even "Starting proxy": refused before connecting
    assert f"Cannot listen on Unix socket {path} for service SSH: " in text and needle in text
    assert "Traceback" not in text
