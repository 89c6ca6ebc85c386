"""localproxy.tokens.source: client tokens (given / file / generated) and rotation on reject.

Rotation runs real boto3 against the emulator's control plane (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    ConfigError,
    HandshakeRejectedError,
    ServiceUnavailableError,
)
from localproxy.settings import Settings
from localproxy.tokens.source import (
    CLIENT_TOKEN_RE,
    TokenSource,
    load_or_create_client_token,
)
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort
from localproxy.websocket.session import open_session

ACCESS_TOKEN = "unit-test-access-token-" + "A" * 40


def tokens_config(**changes: Any) -> ProxyConfig:
    values: dict[str, Any] = {
        "mode": Mode.SOURCE,
        "access_token": ACCESS_TOKEN,
        "endpoint": ServiceEndpoint.parse("ws://127.0.0.1:9"),
        "services": {"SSH": SourcePort(0)},
        "settings": Settings(ping_period_ms=5000),
    }
    values.update(changes)
    return ProxyConfig(**values)


# --- client tokens ----------------------------------------------------------------


def test_generated_client_token_is_stable_and_valid(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localproxy")
    tokens = TokenSource(tokens_config())
    token = tokens.client_token
    assert CLIENT_TOKEN_RE.match(token) and len(token) == 36
    assert tokens.client_token == token  # same for every reconnect of the process
    assert TokenSource(tokens_config()).client_token != token  # fresh per process
    assert tokens.access_token == ACCESS_TOKEN
    assert any("generated client token" in r.getMessage() for r in caplog.records)
    assert all(token not in r.getMessage() and ACCESS_TOKEN not in r.getMessage() for r in caplog.records)


def test_given_client_token_wins(tmp_path: Path) -> None:
    given = "g" * 40
    path = tmp_path / "client-token"
    assert TokenSource(tokens_config(client_token=given, client_token_file=str(path))).client_token == given
    assert not path.exists()
    assert TokenSource(tokens_config(client_token="c" * 40), client_token=given).client_token == given


@pytest.mark.parametrize("bad", ["short", "x" * 129, "has space " * 4, "ünïcode-" * 5])
def test_invalid_given_client_token(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        TokenSource(tokens_config(client_token=bad))
    assert bad not in str(info.value)


def test_client_token_file_created_0600_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localproxy")
    path = tmp_path / "client-token"
    first = TokenSource(tokens_config(client_token_file=str(path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first.client_token
    assert CLIENT_TOKEN_RE.match(first.client_token)
    second = TokenSource(tokens_config(client_token_file=str(path)))  # a restart
    assert second.client_token == first.client_token
    messages = [r.getMessage() for r in caplog.records]
    assert any("saved it to" in m for m in messages) and any("from " + str(path) in m for m in messages)
    assert all(first.client_token not in m for m in messages)


def test_client_token_file_invalid_content(tmp_path: Path) -> None:
    path = tmp_path / "client-token"
    path.write_text("not a token\n")
    with pytest.raises(ConfigError, match="does not hold a valid client token"):
        TokenSource(tokens_config(client_token_file=str(path)))


def test_client_token_file_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot create client token file"):
        load_or_create_client_token(str(tmp_path / "no" / "such" / "dir" / "token"))


def test_client_token_file_loose_permissions_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "client-token"
    path.write_text("k" * 48 + "\n")
    os.chmod(path, 0o644)
    token, created = load_or_create_client_token(str(path))
    assert (token, created) == ("k" * 48, False)
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


def test_rotate_on_reject_needs_tunnel_id() -> None:
    with pytest.raises(ConfigError, match="--tunnel-id"):
        TokenSource(tokens_config(rotate_on_reject=True))


async def test_no_rotation_when_disabled_or_other_error() -> None:
    used = AccessTokenUsedError("used", status=400)
    assert await TokenSource(tokens_config()).on_rejected(used) is False
    rotating = TokenSource(tokens_config(rotate_on_reject=True, tunnel_id="t-1", region="us-east-1"))
    assert await rotating.on_rejected(HandshakeRejectedError("no", status=403)) is False
    assert await rotating.on_rejected(ServiceUnavailableError("later", status=503)) is False
    assert rotating.access_token == ACCESS_TOKEN and rotating.rotations == 0


# --- against the emulator ---------------------------------------------------------


@pytest.fixture
def session_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Fake credentials, no user AWS config: boto3 only talks to the emulator."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_IOTSECURETUNNELING"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
async def session_emulator(session_aws_env: None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0, region="us-east-1") as emulator:
        monkeypatch.setenv("AWS_ENDPOINT_URL", emulator.api_url)
        yield emulator


def emulator_config(emulator: Any, token: str, **changes: Any) -> ProxyConfig:
    return tokens_config(access_token=token, endpoint=ServiceEndpoint.parse(emulator.data_url), **changes)


async def connect_once(config: ProxyConfig, access_token: str, client_token: str | None) -> None:
    ws, _ = await asyncio.wait_for(
        open_session(config, access_token=access_token, client_token=client_token, open_timeout=5), 10
    )
    await ws.close()


async def test_generated_client_token_allows_reconnect(session_emulator: Any) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])
    config = emulator_config(session_emulator, tunnel.source_token)
    tokens = TokenSource(config)
    for _ in range(3):  # reconnects of one process reuse the access token
        await connect_once(config, tokens.access_token, tokens.client_token)
    assert session_emulator.handshake_count(tunnel.tunnel_id, "source") == 3


async def test_client_token_file_survives_restart(session_emulator: Any, tmp_path: Path) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])
    config = emulator_config(session_emulator, tunnel.source_token, client_token_file=str(tmp_path / "ct"))
    first = TokenSource(config)
    await connect_once(config, first.access_token, first.client_token)
    restarted = TokenSource(config)
    await connect_once(config, restarted.access_token, restarted.client_token)
    assert session_emulator.handshake_count(tunnel.tunnel_id, "source") == 2


async def test_rotate_on_reject_recovers_source(session_emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localproxy")
    tunnel = session_emulator.open_tunnel(services=["SSH"])
    config = emulator_config(session_emulator, tunnel.source_token, tunnel_id=tunnel.tunnel_id,
                             rotate_on_reject=True, region="us-east-1")
    await connect_once(config, tunnel.source_token, None)  # someone spent the token
    tokens = TokenSource(config)
    with pytest.raises(AccessTokenUsedError) as info:
        await connect_once(config, tokens.access_token, tokens.client_token)
    assert await tokens.on_rejected(info.value) is True
    assert tokens.access_token != tunnel.source_token and tokens.rotations == 1
    await connect_once(config, tokens.access_token, tokens.client_token)
    await connect_once(config, tokens.access_token, tokens.client_token)  # client token binds the new one
    messages = [r.getMessage() for r in caplog.records]
    assert any(tunnel.tunnel_arn in m and "Rotated" in m for m in messages)
    assert all(tokens.access_token not in m and tunnel.source_token not in m for m in messages)


async def test_rotate_on_reject_destination_keeps_destination_config(session_emulator: Any) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH", "WEB"], thing_name="RemoteThing1")
    config = emulator_config(
        session_emulator, tunnel.destination_token, mode=Mode.DESTINATION, tunnel_id=tunnel.tunnel_id,
        rotate_on_reject=True, services={"SSH": DestinationTarget(port=22), "WEB": DestinationTarget(port=80)},
    )
    tokens = TokenSource(config, client_token="m" * 40)
    await connect_once(config, tokens.access_token, "o" * 40)  # bound to another client token
    with pytest.raises(ClientTokenMismatchError) as info:
        await connect_once(config, tokens.access_token, tokens.client_token)
    assert await tokens.on_rejected(info.value) is True
    await connect_once(config, tokens.access_token, tokens.client_token)
    described = session_emulator.describe(tunnel.tunnel_id)
    assert described["destinationConfig"] == {"thingName": "RemoteThing1", "services": ["SSH", "WEB"]}


async def test_rotations_are_bounded(session_emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])
    config = emulator_config(session_emulator, tunnel.source_token, tunnel_id=tunnel.tunnel_id,
                             rotate_on_reject=True, max_rotations=1)
    tokens = TokenSource(config)
    used = AccessTokenUsedError("used", status=400)
    assert await tokens.on_rejected(used) is True
    assert await tokens.on_rejected(used) is False
    assert tokens.rotations == 1
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_rotation_failure_returns_false(session_emulator: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = emulator_config(session_emulator, "whatever-token-" * 3, tunnel_id="no-such-tunnel",
                             rotate_on_reject=True)
    tokens = TokenSource(config)
    assert await tokens.on_rejected(AccessTokenUsedError("used", status=400)) is False
    assert any("ResourceNotFoundException" in r.getMessage() for r in caplog.records)
