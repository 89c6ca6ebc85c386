"""``localproxy connect THING SSH`` end to end, with real parts: the emulator (boto3 control
API, MQTT notify), our device agent in front of an SSH server, ``connect`` as a child process
whose stdin/stdout carry an asyncssh (or OpenSSH) client connection.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("aiomqtt", reason="needs the mqtt extra")
pytest.importorskip("asyncssh")
pytest.importorskip("boto3")

from connect_rig import ConnectRig, device, tunnel_count  # noqa: E402

from localproxy.testing.aws import api_for, call  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def rig() -> AsyncIterator[ConnectRig]:
    async with device() as dev:
        the_rig = ConnectRig(dev)
        try:
            yield the_rig
        finally:
            await the_rig.cleanup()


async def only_tunnel_id(rig: ConnectRig) -> str:
    listed = await call(api_for(rig.dev.emu).list_tunnels, thingName=rig.dev.thing)
    (summary,) = listed["tunnelSummaries"]
    return str(summary["tunnelId"])


async def test_first_connect_opens_one_tunnel_that_concurrent_and_later_sessions_share(rig: ConnectRig) -> None:
    emu = rig.dev.emu
    async with rig.ssh("--idle-exit", "2") as (conn, err):
        result = await conn.run("echo hello", check=True)
        assert result.stdout == b"hello\n"
    said = b"".join(err).decode()
    assert "opening one" in said and "opened tunnel" in said and "Traceback" not in said
    tunnel_id = await only_tunnel_id(rig)
    (server,) = rig.server_pids()

    # Two at once (two terminals): both work, interleaved, and neither disconnects the other.
    async with rig.ssh() as (first, _), rig.ssh() as (second, err2):
        payload_a, payload_b = os.urandom(300_000), os.urandom(200_000)
        a, b = await asyncio.gather(
            first.run("cat", input=payload_a, check=True), second.run("cat", input=payload_b, check=True)
        )
        assert a.stdout == payload_a and b.stdout == payload_b
        assert (await first.run("echo still-here", check=True)).stdout == b"still-here\n"
    assert b"".join(err2) == b""  # reuse is silent
    # A third after both closed: same tunnel, same source (one source handshake: no rotation).
    async with rig.ssh() as (third, _):
        assert (await third.run("echo third", check=True)).stdout == b"third\n"
    assert await tunnel_count(emu, rig.dev.thing) == 1
    assert await only_tunnel_id(rig) == tunnel_id
    assert rig.server_pids() == [server]
    assert emu.handshake_count(tunnel_id, "source") == 1
    # The source token never shows: not in the shared source's log, not on stderr.
    source_token = emu.tunnel(tunnel_id).tokens["source"].value
    assert source_token not in rig.logs() and source_token not in said
    # Idle: the shared source exits; the tunnel stays open for the next connect.
    await rig.wait_servers_gone()
    assert await tunnel_count(emu, rig.dev.thing, "OPEN") == 1


async def test_close_on_exit_closes_the_tunnel_when_the_last_connection_ends(rig: ConnectRig) -> None:
    async with rig.ssh("--close-on-exit") as (conn, _):
        assert (await conn.run("echo bye", check=True)).stdout == b"bye\n"
    await rig.wait_servers_gone()
    assert await tunnel_count(rig.dev.emu, rig.dev.thing, "CLOSED") == 1, rig.logs()
    assert await tunnel_count(rig.dev.emu, rig.dev.thing, "OPEN") == 0


async def test_reuses_a_tunnel_opened_elsewhere_and_republishes_the_token_to_a_device_that_missed_it() -> None:
    async with device(agent=False) as dev:
        rig = ConnectRig(dev)
        try:
            api = api_for(dev.emu)
            # Opened while the device was offline: its notification is lost.
            opened = await call(api.open_tunnel, destinationConfig={"thingName": dev.thing, "services": ["SSH"]})
            async with dev.agent():
                mark = dev.emu.event_mark()
                async with rig.ssh() as (conn, err):
                    assert (await conn.run("echo back", check=True)).stdout == b"back\n"
                said = b"".join(err).decode()
                assert f"reusing open tunnel {opened['tunnelId']}" in said
                assert "$aws/things/device-42/tunnels/notify" in said  # it said what it waits for
                await dev.emu.wait_event("notify", since=mark, thing_name=dev.thing)  # a rotation published
                assert await tunnel_count(dev.emu, dev.thing) == 1
        finally:
            await rig.cleanup()


async def test_no_share_runs_a_source_of_its_own_in_process_with_the_stdlib_loop(rig: ConnectRig) -> None:
    """The path Windows takes (no Unix sockets): no shared server, one connection, same result."""
    async with rig.ssh("--no-share", "--close-on-exit") as (conn, err):
        assert (await conn.run("echo alone", check=True)).stdout == b"alone\n"
        assert rig.server_pids() == []
    code = await asyncio.wait_for(rig.last_process.wait(), 20)
    assert code == 0, b"".join(err)
    assert "Traceback" not in b"".join(err).decode()
    assert await tunnel_count(rig.dev.emu, rig.dev.thing, "CLOSED") == 1


async def test_openssh_client_with_connect_as_its_proxycommand(rig: ConnectRig) -> None:
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("no OpenSSH ssh client")
    env = rig.env
    proxy = shlex.join([sys.executable, "-m", "localproxy.connect", "%h", "SSH", "-e", rig.dev.emu.data_url])

    async def run_ssh(command: str) -> tuple[int, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            ssh, "-F", "none", "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"op@{rig.dev.thing}", command, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return int(process.returncode or 0), out, err

    first = await run_ssh("echo one")
    assert first[:2] == (0, b"one\n"), first
    # Two at once, then a third: still the one tunnel.
    both = await asyncio.gather(run_ssh("echo two"), run_ssh("echo three"))
    assert [r[:2] for r in both] == [(0, b"two\n"), (0, b"three\n")], both
    assert (await run_ssh("echo four"))[:2] == (0, b"four\n")
    assert await tunnel_count(rig.dev.emu, rig.dev.thing) == 1


SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None)


async def start_sshd(directory: Path) -> tuple[asyncio.subprocess.Process, int, Path]:
    """A real OpenSSH sshd on 127.0.0.1 for this user, key login only -> (process, port, user key)."""
    assert SSHD is not None
    for name in ("host_key", "user_key"):
        keygen = await asyncio.create_subprocess_exec(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(keygen.wait(), 30) == 0
    (directory / "authorized_keys").write_text((directory / "user_key.pub").read_text())
    with socket.socket() as probe:  # a free port (sshd cannot pick one and tell us)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile {directory / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nSubsystem sftp internal-sftp\n"  # scp speaks SFTP since OpenSSH 9
    )
    if os.geteuid() == 0:  # sshd run as root wants its privilege-separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        SSHD, "-D", "-e", "-f", str(directory / "sshd_config"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(30):
        seen = b""
        while b"Server listening" not in (line := await process.stderr.readline()):
            seen += line
            if not line:
                raise AssertionError(f"sshd did not start: {seen.decode(errors='replace')}")
    return process, port, directory / "user_key"


@pytest.mark.skipif(SSHD is None or shutil.which("ssh") is None, reason="needs OpenSSH ssh and sshd")
async def test_openssh_to_a_real_sshd_behind_the_agent_with_scp_beside_ssh() -> None:
    directory = Path(tempfile.mkdtemp(prefix="lpc-sshd-"))
    sshd, port, key = await start_sshd(directory)
    try:
        async with device(ssh_port=port) as dev:
            rig = ConnectRig(dev)
            try:
                proxy = shlex.join([sys.executable, "-m", "localproxy.connect", "%h", "SSH", "-e", dev.emu.data_url])
                options = ["-F", "none", "-i", str(key), "-o", f"ProxyCommand={proxy}", "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "LogLevel=ERROR"]  # fmt: skip
                user = getpass.getuser()

                messages: list[bytes] = []  # connect's progress lines reach ssh's stderr

                async def run(*command: str) -> tuple[int, bytes]:
                    process = await asyncio.create_subprocess_exec(
                        *command, env=rig.env, stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    try:
                        out, err = await asyncio.wait_for(process.communicate(), 60)
                    finally:
                        if process.returncode is None:
                            process.kill()
                            await process.wait()
                    messages.append(err)
                    return int(process.returncode or 0), out

                assert await run("ssh", *options, f"{user}@{dev.thing}", "echo one") == (0, b"one\n")
                payload = directory / "payload"
                payload.write_bytes(os.urandom(1 << 20))
                copy = directory / "copy"
                # ssh and scp at once, sharing the one tunnel.
                ssh_result, scp_result = await asyncio.gather(
                    run("ssh", *options, f"{user}@{dev.thing}", "sleep 1; echo two"),
                    run("scp", *options, str(payload), f"{user}@{dev.thing}:{copy}"),
                )
                assert ssh_result == (0, b"two\n") and scp_result[0] == 0, (ssh_result, scp_result, messages)
                assert copy.read_bytes() == payload.read_bytes()
                assert await run("ssh", *options, f"{user}@{dev.thing}", "echo three") == (0, b"three\n")
                assert await tunnel_count(dev.emu, dev.thing) == 1
                assert b"opened tunnel" in messages[0] and not any(b"opened tunnel" in m for m in messages[1:])
                assert not any(b"Traceback" in m for m in messages), messages
            finally:
                await rig.cleanup()
    finally:
        sshd.terminate()
        await asyncio.wait_for(sshd.wait(), 30)
        shutil.rmtree(directory, ignore_errors=True)
