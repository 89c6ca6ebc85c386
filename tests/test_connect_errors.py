"""``localproxy connect`` with bad input: each a clear message on stderr, the documented exit
code, no traceback, no token, and no process left running."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("aiomqtt", reason="needs the mqtt extra")
pytest.importorskip("asyncssh")
pytest.importorskip("boto3")

from connect_rig import ROOT, ConnectRig, Device, device, tunnel_count  # noqa: E402

from localproxy.errors import ExitCode  # noqa: E402
from localproxy.testing.aws import api_for, call  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "Error:" not in stderr.split("localproxy connect:")[0]


@pytest.fixture
async def offline() -> AsyncIterator[Device]:
    """The emulator and the SSH server, but no agent: the device never connects."""
    async with device(agent=False) as dev:
        yield dev


async def finish(rig: ConnectRig) -> None:
    """The shared server exits by itself (idle), and nothing else is left."""
    try:
        await rig.wait_servers_gone()
    finally:
        assert await rig.cleanup() == []


async def test_a_device_that_never_connects_bounded_wait_exit_code_and_advice(offline: Device) -> None:
    rig = ConnectRig(offline)
    try:
        started = asyncio.get_running_loop().time()
        run = await rig.run("--wait", "1.5", "--idle-exit", "0.5")
        elapsed = asyncio.get_running_loop().time() - started
        assert run.code == ExitCode.DEVICE_NOT_CONNECTED, run.stderr
        assert "did not connect" in run.stderr and "$aws/things/device-42/tunnels/notify" in run.stderr
        assert "agent" in run.stderr and "--wait" in run.stderr and "waiting up to 1.5 s" in run.stderr
        clean(run.stderr)
        assert elapsed < 15  # bounded by --wait (plus start-up), not by a default
        # The tunnel it opened stays open for the next try (no second tunnel, no second cost),
        # even after the shared source has gone (idle).
        await rig.wait_servers_gone()
        again = await rig.run("--wait", "0.2", "--idle-exit", "0.5")
        assert again.code == ExitCode.DEVICE_NOT_CONNECTED and "reusing open tunnel" in again.stderr
        assert await tunnel_count(offline.emu, offline.thing) == 1
        # A token nobody reads is published again at each try.
        assert len(offline.emu.notifications(offline.thing)) == 2
    finally:
        await finish(rig)


async def test_an_invalid_thing_name_is_a_usage_error(offline: Device) -> None:
    rig = ConnectRig(offline)
    try:
        run = await rig.run("--wait", "1", "--idle-exit", "0.5", thing="no such/thing!")
        assert run.code == ExitCode.USAGE, run.stderr
        assert "thingName" in run.stderr
        clean(run.stderr)
        assert await tunnel_count(offline.emu, offline.thing) == 0
    finally:
        await finish(rig)


async def test_no_credentials_says_so(offline: Device) -> None:
    rig = ConnectRig(offline)
    env = {k: v for k, v in rig.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    process = await asyncio.create_subprocess_exec(
        *rig.command("--idle-exit", "0.5"), env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == ExitCode.CONTROL_API, err
        assert b"no AWS credentials" in err and out == b""
        clean(err.decode())
    finally:
        await finish(rig)


async def test_the_tunnel_closed_during_a_session_ends_it_with_exit_6_and_the_next_opens_another() -> None:
    async with device() as dev:
        rig = ConnectRig(dev)
        try:
            async with rig.ssh("--idle-exit", "0.5") as (conn, err):
                assert (await conn.run("echo up", check=True)).stdout == b"up\n"
                listed = await call(api_for(dev.emu).list_tunnels, thingName=dev.thing)
                tunnel_id = listed["tunnelSummaries"][0]["tunnelId"]
                process = await conn.create_process("cat")
                await call(api_for(dev.emu).close_tunnel, tunnelId=tunnel_id)
                await asyncio.wait_for(process.wait_closed(), 20)
                code = await asyncio.wait_for(rig.last_process.wait(), 20)
            assert code == ExitCode.TUNNEL_CLOSED, b"".join(err)
            said = b"".join(err).decode()
            assert "closed" in said
            clean(said)
            # The next connect opens a new tunnel (the closed one cannot be reused).
            async with rig.ssh() as (conn, _):
                assert (await conn.run("echo new", check=True)).stdout == b"new\n"
            assert await tunnel_count(dev.emu, dev.thing, "OPEN") == 1
            assert await tunnel_count(dev.emu, dev.thing, "CLOSED") == 1
        finally:
            await finish(rig)


async def test_a_source_token_revoked_under_the_shared_source_ends_it_without_a_traceback() -> None:
    """Someone else rotated the source token (the console, another machine): our token is spent."""
    async with device() as dev:
        rig = ConnectRig(dev)
        try:
            async with rig.ssh("--idle-exit", "0.5") as (conn, err):
                listed = await call(api_for(dev.emu).list_tunnels, thingName=dev.thing)
                tunnel_id = listed["tunnelSummaries"][0]["tunnelId"]
                process = await conn.create_process("cat")
                rotated = await call(api_for(dev.emu).rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="SOURCE")
                await asyncio.wait_for(process.wait_closed(), 20)
                code = await asyncio.wait_for(rig.last_process.wait(), 20)
            said = b"".join(err).decode()
            assert code in (ExitCode.HANDSHAKE_REJECTED, ExitCode.ACCESS_TOKEN_USED), said
            assert "connection ended" in said
            clean(said)
            await rig.wait_servers_gone()  # a fatal error stops the shared source
            assert rotated["sourceAccessToken"] not in said + rig.logs()
        finally:
            await finish(rig)


async def test_stdin_closed_early_exits_quietly() -> None:
    async with device() as dev:
        rig = ConnectRig(dev)
        try:
            run = await rig.run("--idle-exit", "0.5", stdin=b"")  # EOF at once, before the tunnel is up
            assert run.code == 0, run.stderr
            clean(run.stderr)
            run = await rig.run(stdin=b"SSH-2.0-half\r\n")  # a partial client, then EOF
            assert run.code == 0, run.stderr
            clean(run.stderr)
        finally:
            await finish(rig)


@pytest.mark.parametrize(
    ("args", "expected"),
    [([], "the following arguments are required"), (["dev", "SSH", "--wait", "soon"], "expected seconds"),
     (["dev", "SSH", "--tunnel-minutes", "0"], "1 to 720"), (["dev", "SSH", "--bogus"], "unrecognized")],
)  # fmt: skip
async def test_usage_errors(args: list[str], expected: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "localproxy", "connect", *args, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == ExitCode.USAGE and out == b""
    assert expected in err.decode() and b"Try 'localproxy connect --help'" in err
    clean(err.decode())


async def test_a_runtime_directory_others_can_write_is_refused(offline: Device) -> None:
    rig = ConnectRig(offline)
    try:
        os.chmod(rig.runtime, 0o777)
        run = await rig.run()
        assert run.code == ExitCode.CONFIG and "mode 0700" in run.stderr, run.stderr
        clean(run.stderr)
        assert rig.server_pids() == [] and not list(rig.runtime.iterdir())
    finally:
        await finish(rig)
