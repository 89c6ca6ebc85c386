"""Security properties: secrets never logged, TLS verified by default, local ports on
loopback by default, and websocket frames the protocol forbids are refused both by
the emulator and by the proxy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from localproxy.emulator import Emulator
from localproxy.errors import ConnectionFailedError, ProtocolError
from localproxy.events import Connected, ErrorEvent
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import V3
from localproxy.types import Mode, SourcePort
from localproxy.wire.codec import MAX_WS_MESSAGE, Message, MessageType, encode_frame

TIMEOUT = 10.0
CLIENT_TOKEN = "security-client-token-0123456789abcdef"
LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net/tcp* writes them


def fast_settings(tmp_path: Path) -> Path:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "50"}}}}))
    return path


# --- secrets never reach the logs --------------------------------------------------------


async def run_pair_at(verbosity: int, emulator: Emulator, rel_kit: Any, rel_processes: Any, app: Any,
                      settings: Path) -> tuple[str, list[str]]:
    """A source (token on the command line, -i client token) and a destination (token in the
    environment, generated client token) at ``-v verbosity``; one round trip; stop both."""
    tunnel = emulator.open_tunnel(services=["SSH"])
    common = ("-e", emulator.data_url, "--settings-json", str(settings), "-v", str(verbosity))
    destination = await rel_processes(*common, "-d", f"SSH=127.0.0.1:{app.port}",
                                      env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token})
    source = await rel_processes(*common, "-s", "SSH=0", "-b", "127.0.0.1", "-t", tunnel.source_token,
                                 "-i", CLIENT_TOKEN)
    await emulator.wait_connected(tunnel.tunnel_id, "source")
    await emulator.wait_connected(tunnel.tunnel_id, "destination")
    if verbosity >= 4:  # the port is only in the info-level log; below, read it from the proxy's events
        port = int((await source.wait_for_line(r"Listening for new connection on port (\d+)")).group(1))
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        writer.write(b"secret-free payload")
        assert await asyncio.wait_for(reader.readexactly(19), TIMEOUT) == b"secret-free payload"
        writer.close()
    # A reconnect and a refused reconnect: the paths that log the most about tokens.
    await emulator.drop(tunnel.tunnel_id, "source")
    await emulator.wait_connected(tunnel.tunnel_id, "source")
    generated = emulator.store.find_token(tunnel.destination_token)
    secrets = [tunnel.source_token, tunnel.destination_token, CLIENT_TOKEN]
    if generated is not None and generated.client_token:
        secrets.append(generated.client_token)
    assert await source.stop() == 0 and await destination.stop() == 0
    spent = await rel_processes(*common, "-s", "0", env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token})
    assert await spent.wait() != 0  # refused: the token is bound to another client token
    return "\n".join([source.text, destination.text, spent.text]), secrets


async def test_tokens_absent_from_output_at_every_verbosity(emulator: Emulator, rel_kit: Any, rel_processes: Any,
                                                            tmp_path: Path) -> None:
    app = await rel_kit.App("echo").start()
    settings = fast_settings(tmp_path)
    runs = await asyncio.gather(*(run_pair_at(v, emulator, rel_kit, rel_processes, app, settings)
                                  for v in range(7)))
    for verbosity, (text, secrets) in enumerate(runs):
        assert len(secrets) == 4, "the destination's generated client token was not found"
        for secret in secrets:
            assert secret not in text, f"a token appears in the output at -v {verbosity}"
        if verbosity >= 5:
            assert "[debug]" in text  # the most verbose runs did log (headers included, redacted)
        if verbosity == 0:
            assert text.strip() == "", f"-v 0 must print nothing:\n{text}"
    await app.close()


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture
async def tls_emulator() -> Any:
    async with Emulator(tls=True) as emulator:  # its own generated CA: not trusted by the system
        yield emulator


async def test_tls_is_verified_by_default(tls_emulator: Emulator, rel_kit: Any) -> None:
    tunnel = tls_emulator.open_tunnel(services=["SSH"])
    config = rel_kit.config(Mode.SOURCE, tunnel.source_token, tls_emulator, {"SSH": SourcePort(0)},
                            settings=rel_kit.settings(connect_retry_count=0))
    assert config.verify_ssl and config.endpoint.tls
    async with LocalProxy(config) as proxy:
        with pytest.raises(ConnectionFailedError) as caught:
            await asyncio.wait_for(proxy.wait_closed(), TIMEOUT)
    assert "certificate" in str(caught.value).lower() or "-c" in str(caught.value)
    assert tls_emulator.handshake_count(tunnel.tunnel_id, "source") == 0


async def test_tls_with_capath_works(tls_emulator: Emulator, rel_kit: Any, rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    capath = {"capath": str(tls_emulator.capath)}
    pair = await rel_pair_factory(tls_emulator, {"SSH": app}, source_kw=capath, destination_kw=capath)
    assert await pair.echo_roundtrip(b"over wss, verified") == b"over wss, verified"
    await app.close()


async def test_insecure_flag_warns_loudly_and_connects(tls_emulator: Emulator, rel_processes: Any) -> None:
    tunnel = tls_emulator.open_tunnel(services=["SSH"])
    proxy = await rel_processes("-e", tls_emulator.data_url, "-k", "-s", "SSH=0", "-b", "127.0.0.1",
                                env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token})
    await proxy.wait_for_line(r"Listening for new connection on port \d+")
    assert await proxy.stop() == 0
    warnings = [line for line in proxy.lines if "[warning]" in line and "SECURITY WARNING" in line]
    assert warnings and "-k" in warnings[0]
    assert tunnel.source_token not in proxy.text


# --- local ports --------------------------------------------------------------------------


async def test_source_listens_on_loopback_by_default(emulator: Emulator, rel_kit: Any) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    config = rel_kit.config(Mode.SOURCE, tunnel.source_token, emulator, {"SSH": SourcePort(0)}, bind_address=None)
    assert config.bind_address is None and config.effective_bind_address == "localhost"
    async with LocalProxy(config) as proxy:
        await asyncio.wait_for(proxy.ready, TIMEOUT)
        addresses = rel_kit.listening_addresses(proxy.ports["SSH"])
    assert addresses and addresses <= LOOPBACK_HEX, f"listening on {addresses}"


# --- frames the protocol forbids ------------------------------------------------------------


async def emulator_session(emulator: Emulator, token: str) -> Any:
    return await connect(f"{emulator.data_url}/tunnel?local-proxy-mode=source", subprotocols=[V3],
                         additional_headers={"access-token": token, "client-token": CLIENT_TOKEN},
                         max_size=None, open_timeout=TIMEOUT)


async def closed_code(ws: Any) -> int:
    with pytest.raises(ConnectionClosed):
        for _ in range(100):  # SERVICE_IDS first, then the close
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert ws.close_code is not None
    return int(ws.close_code)


async def test_emulator_closes_on_text_oversize_and_bad_frames(emulator: Emulator) -> None:
    tunnel = emulator.open_tunnel(services=["SSH"])
    cases = {
        "text": ("a text frame", 1003),
        "oversize": (b"\x00" * (MAX_WS_MESSAGE + 1), 1009),
        "frame over 64 KiB payload": (encode_frame(Message(MessageType.STREAM_START, stream_id=1, service_id="SSH"))
                                      + b"\xff\xff" + b"\x08" * 65535, 1008),
    }
    for name, (data, code) in cases.items():
        ws = await emulator_session(emulator, tunnel.source_token)
        await ws.send(data)
        assert await closed_code(ws) == code, name


class FakeService:
    """A websocket server that accepts the proxy's upgrade, then sends one bad message."""

    def __init__(self, bad: str | bytes) -> None:
        self.bad = bad
        self.sessions = 0
        self.close_codes: list[int | None] = []
        self.reconnected = asyncio.Event()

    async def handler(self, ws: Any) -> None:
        self.sessions += 1
        if self.sessions > 1:
            self.reconnected.set()
            await ws.wait_closed()
            return
        await ws.send(encode_frame(Message(MessageType.SERVICE_IDS, available_service_ids=("SSH",))))
        await ws.send(self.bad)
        await ws.wait_closed()
        self.close_codes.append(ws.close_code)


@pytest.mark.parametrize("bad", ["text", "oversize"])
async def test_proxy_refuses_text_and_oversize_messages_then_reconnects(rel_kit: Any, bad: str) -> None:
    service = FakeService("a text message" if bad == "text" else b"\x00" * (MAX_WS_MESSAGE + 1))
    async with serve(service.handler, "127.0.0.1", 0, subprotocols=[V3], max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        fake = type("FakeEmulator", (), {"data_url": f"ws://127.0.0.1:{port}"})()
        events: list[Any] = []
        config = rel_kit.config(Mode.SOURCE, "fake-token", fake, {"SSH": SourcePort(0)})
        async with LocalProxy(config) as proxy:
            proxy.subscribe(events.append)
            await asyncio.wait_for(service.reconnected.wait(), TIMEOUT)
    assert service.sessions >= 2
    if bad == "text":
        errors = [e for e in events if isinstance(e, ErrorEvent)]
        assert errors and isinstance(errors[0].error, ProtocolError) and not errors[0].fatal
    else:
        assert service.close_codes and service.close_codes[0] == 1009  # message too big
    assert isinstance(events[0], Connected)
