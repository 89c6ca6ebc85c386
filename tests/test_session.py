"""localproxy.websocket.session: one websocket attempt, headers, TLS, HTTPS proxy, typed rejections.

Real sockets on loopback: a raw HTTP server that answers refusals, a real
websockets server, a real CONNECT proxy written here, and the emulator.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
import trustme
from connect_proxy import ConnectProxy
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    ConfigError,
    ConnectionFailedError,
    ExitCode,
    HandshakeRejectedError,
    ProtocolError,
    ServiceUnavailableError,
    UsageError,
)
from localproxy.settings import V2, V3, Settings
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort
from localproxy.websocket.session import (
    Backoff,
    normalize_proxy_url,
    open_session,
    user_agent,
)

ACCESS_TOKEN = "AQGAAXiTest" + uuid.uuid4().hex + "AccessToken"
CLIENT_TOKEN = "client-" + uuid.uuid4().hex
USED_BODY = "Invalid access token: The access token was previously used and can not be used again."
MISMATCH_BODY = (
    "Invalid client token: The provided client token does not match the client token that was previously set."
)


def session_config(url: str, **changes: object) -> ProxyConfig:
    base = ProxyConfig(
        mode=Mode.SOURCE,
        access_token=ACCESS_TOKEN,
        endpoint=ServiceEndpoint.parse(url),
        services={"SSH": SourcePort(0)},
        region="eu-west-1",
        tunnel_id="tun-123",
        settings=Settings(ping_period_ms=5000),
    )
    return replace(base, **changes)


class RawHttpServer:
    """Answers every request with one fixed HTTP response and records the request head."""

    def __init__(self, response: bytes | None) -> None:
        self.response = response  # None: accept and never answer (timeout test)
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "RawHttpServer":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for writer in self._writers:
            writer.close()
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
        self.requests.append((lines[0], headers))  # type: ignore[arg-type]
        if self.response is not None:
            writer.write(self.response)
            await writer.drain()
            writer.close()


def http_response(status: int, reason: str, body: str, extra: str = "") -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n{extra}"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


async def attempt(config: ProxyConfig, client_token: str | None = CLIENT_TOKEN, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(
        open_session(config, access_token=ACCESS_TOKEN, client_token=client_token, open_timeout=timeout), 10
    )


# --- rejections -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "body", "error_type", "exit_code"),
    [
        (400, "Bad Request", USED_BODY, AccessTokenUsedError, ExitCode.ACCESS_TOKEN_USED),
        # the documented variant: "cannot", no final period, other case
        (400, "Bad Request", "invalid access token: the access token was previously used and cannot be used again",
         AccessTokenUsedError, ExitCode.ACCESS_TOKEN_USED),
        (400, "Bad Request", MISMATCH_BODY, ClientTokenMismatchError, ExitCode.CLIENT_TOKEN_MISMATCH),
        (400, "Bad Request", MISMATCH_BODY.rstrip("."), ClientTokenMismatchError, ExitCode.CLIENT_TOKEN_MISMATCH),
        (403, "Forbidden", "Invalid access token", HandshakeRejectedError, ExitCode.HANDSHAKE_REJECTED),
        (401, "Unauthorized", "", HandshakeRejectedError, ExitCode.HANDSHAKE_REJECTED),
        (503, "Service Unavailable", "try later", ServiceUnavailableError, ExitCode.CONNECTION_FAILED),
    ],
)
async def test_rejection_is_classified_with_advice(
    status: int, reason: str, body: str, error_type: type, exit_code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="localproxy")
    async with RawHttpServer(http_response(status, reason, body)) as server:
        with pytest.raises(HandshakeRejectedError) as info:
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"))
    error = info.value
    assert type(error) is error_type
    assert error.exit_code == exit_code
    assert error.status == status
    assert error.retryable == (status >= 500)
    message = str(error)
    assert ACCESS_TOKEN not in message and CLIENT_TOKEN not in message
    if status < 500:
        assert (
            "aws iotsecuretunneling rotate-tunnel-access-token --tunnel-id tun-123 --client-mode SOURCE "
            "--region eu-west-1" in message
        )
        assert "export AWSIOT_TUNNEL_ACCESS_TOKEN=<new token>" in message
    reference = f'Proxy server rejected web socket upgrade request: (HTTP/1.1 {status} {reason}) "{body}"'
    record = next(r for r in caplog.records if r.getMessage() == reference)
    assert record.levelno == (logging.WARNING if status >= 500 else logging.ERROR)
    assert all(ACCESS_TOKEN not in r.getMessage() for r in caplog.records)


async def test_access_token_used_explains_single_use_and_client_tokens() -> None:
    async with RawHttpServer(http_response(400, "Bad Request", USED_BODY)) as server:
        with pytest.raises(AccessTokenUsedError) as info:
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"), client_token=None)
    message = str(info.value)
    assert "single-use" in message
    assert "--rotate-on-reject --tunnel-id tun-123" in message
    assert "--client-token-file" in message
    assert "sourceAccessToken" in message


async def test_destination_advice_names_thing_and_services_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    async with RawHttpServer(http_response(400, "Bad Request", MISMATCH_BODY)) as server:
        config = session_config(
            f"ws://127.0.0.1:{server.port}",
            mode=Mode.DESTINATION,
            services={"SSH": DestinationTarget(port=22), "WEB": DestinationTarget(port=80)},
            tunnel_id=None,
            region=None,
        )
        with pytest.raises(ClientTokenMismatchError) as info:
            await attempt(config)
    message = str(info.value)
    assert (
        "aws iotsecuretunneling rotate-tunnel-access-token --tunnel-id <tunnel-id> --client-mode DESTINATION "
        "--destination-config thingName=<thing-name>,services=SSH,WEB --region <region>" in message
    )
    assert "destinationAccessToken" in message
    assert "$aws/things/<thing-name>/tunnels/notify" in message
    assert "each run of localproxy generates its own client token" in message


def test_advice_region_from_host_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from localproxy.tokens.advice import region_of

    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert region_of(session_config("data.tunneling.iot.cn-north-1.amazonaws.com.cn", region=None)) == "cn-north-1"
    assert region_of(session_config("ws://127.0.0.1:1", region=None)) == "ap-south-1"
    assert region_of(session_config("ws://127.0.0.1:1", region="us-west-2")) == "us-west-2"


async def test_token_echoed_in_body_is_redacted() -> None:
    body = f"Invalid access token: {ACCESS_TOKEN} client {CLIENT_TOKEN}"
    async with RawHttpServer(http_response(400, "Bad Request", body)) as server:
        with pytest.raises(HandshakeRejectedError) as info:
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"))
    assert ACCESS_TOKEN not in str(info.value) and CLIENT_TOKEN not in str(info.value)
    assert ACCESS_TOKEN not in info.value.body
    assert "<redacted>" in info.value.body


async def test_classification_ignores_masking_of_short_secrets() -> None:
    from localproxy.ops.logs import register_secret

    register_secret("token")  # a (silly) secret that is also a word of the body
    async with RawHttpServer(http_response(400, "Bad Request", USED_BODY)) as server:
        with pytest.raises(AccessTokenUsedError) as info:
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"))
    assert "token" not in info.value.body  # shown masked, yet classified right


async def test_redirect_is_not_followed() -> None:
    async with RawHttpServer(http_response(400, "Bad Request", "should never be asked")) as elsewhere:
        redirect = http_response(302, "Found", "", extra=f"Location: ws://127.0.0.1:{elsewhere.port}/tunnel\r\n")
        async with RawHttpServer(redirect) as server:
            with pytest.raises(HandshakeRejectedError) as info:
                await attempt(session_config(f"ws://127.0.0.1:{server.port}"))
        assert elsewhere.requests == []  # the access token went nowhere else
    assert info.value.status == 302
    assert "redirect" in str(info.value)


async def test_request_line_and_headers() -> None:
    async with RawHttpServer(http_response(400, "Bad Request", "")) as server:
        with pytest.raises(HandshakeRejectedError):
            await attempt(session_config(f"ws://127.0.0.1:{server.port}", mode=Mode.DESTINATION,
                                         services={"SSH": DestinationTarget(port=22)}))
    request_line, headers = server.requests[0]
    assert request_line == "GET /tunnel?local-proxy-mode=destination HTTP/1.1"
    lowered = [(name.lower(), value) for name, value in headers]
    assert lowered.count(("access-token", ACCESS_TOKEN)) == 1
    assert lowered.count(("client-token", CLIENT_TOKEN)) == 1
    assert [v for n, v in lowered if n == "sec-websocket-protocol"] == [V3]
    assert not [n for n, _ in lowered if n == "sec-websocket-extensions"]  # compression off
    assert [v for n, v in lowered if n == "user-agent"] == [user_agent()]
    head_size = len(request_line) + sum(len(n) + len(v) + 4 for n, v in headers)
    assert head_size < 4096


async def test_no_client_token_header_when_none() -> None:
    async with RawHttpServer(http_response(400, "Bad Request", "")) as server:
        with pytest.raises(HandshakeRejectedError):
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"), client_token=None)
    names = [name.lower() for name, _ in server.requests[0][1]]
    assert "client-token" not in names and "access-token" in names


def test_user_agent_names_versions() -> None:
    assert re.fullmatch(
        r"localproxy-python/\S+ python/3\.\d+\.\d+ websockets/\S+ (openssl|libressl)/\S+ \w+", user_agent()
    )


# --- connection failures ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_connection_is_connection_failed() -> None:
    with pytest.raises(ConnectionFailedError) as info:
        await attempt(session_config(f"ws://127.0.0.1:{free_port()}"))
    assert info.value.exit_code == ExitCode.CONNECTION_FAILED
    assert "127.0.0.1" in str(info.value)


async def test_silent_server_times_out() -> None:
    async with RawHttpServer(None) as server:
        with pytest.raises(ConnectionFailedError, match="Timed out"):
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"), timeout=0.3)


async def test_not_http_answer_is_connection_failed() -> None:
    async with RawHttpServer(b"SSH-2.0-OpenSSH\r\n\r\n") as server:
        with pytest.raises(ConnectionFailedError):
            await attempt(session_config(f"ws://127.0.0.1:{server.port}"))


# --- successful sessions against a real websockets server --------------------------


def channel_id_response(channel_id: str | None) -> Callable[[ServerConnection, Request, Response], Response]:
    def process_response(connection: ServerConnection, request: Request, response: Response) -> Response:
        if channel_id is not None:
            response.headers["channel-id"] = channel_id
        return response

    return process_response


async def _hold(ws: ServerConnection) -> None:
    await ws.wait_closed()


@pytest.fixture
async def session_ws_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, list[Headers]]]:
    """A websockets server speaking the given subprotocols (param), adding a channel-id."""
    subprotocols = getattr(request, "param", [V3])
    seen: list[Headers] = []
    # "force-V2": answer V2 whatever the client offered (a misbehaving server).
    forced = {"select_subprotocol": lambda connection, offered: V2} if subprotocols == ["force-V2"] else {}

    def process_request(connection: ServerConnection, req: Request) -> None:
        seen.append(req.headers)

    async with serve(
        _hold, "127.0.0.1", 0, subprotocols=[V2] if forced else subprotocols, process_request=process_request,
        process_response=channel_id_response("chan-0042"), **forced,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield port, seen


async def test_open_session_returns_info_and_sets_nodelay(session_ws_server: tuple[int, list[Headers]]) -> None:
    port, seen = session_ws_server
    ws, info = await attempt(session_config(f"ws://127.0.0.1:{port}"))
    try:
        assert info.subprotocol == V3 == ws.subprotocol
        assert info.channel_id == "chan-0042"
        sock = ws.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # websockets 16+ calls it max_message_size (15: max_size)
        limit = getattr(ws.protocol, "max_message_size", None) or getattr(ws.protocol, "max_size", None)
        assert limit is not None and limit >= 131076
        assert seen[0]["access-token"] == ACCESS_TOKEN
    finally:
        await ws.close()


@pytest.mark.parametrize("session_ws_server", [None, ["force-V2"]], indirect=True)
async def test_session_without_our_subprotocol_fails(session_ws_server: tuple[int, list[Headers]]) -> None:
    # None: the server echoes no subprotocol; force-V2: it answers one we did not offer.
    port, _ = session_ws_server
    with pytest.raises(ProtocolError, match="subprotocol"):
        await attempt(session_config(f"ws://127.0.0.1:{port}"))


@pytest.mark.parametrize("session_ws_server", [[V2]], indirect=True)
async def test_configured_subprotocol_is_the_one_sent(session_ws_server: tuple[int, list[Headers]]) -> None:
    port, seen = session_ws_server
    ws, info = await attempt(session_config(f"ws://127.0.0.1:{port}", settings=Settings(subprotocol=V2)))
    await ws.close()
    assert info.subprotocol == V2
    assert seen[0].get_all("Sec-WebSocket-Protocol") == [V2]


# --- TLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def session_wss_server(session_ca: trustme.CA) -> AsyncIterator[int]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    session_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    async with serve(_hold, "127.0.0.1", 0, ssl=server_context, subprotocols=[V3],
                     process_response=channel_id_response("tls-chan")) as server:
        yield next(iter(server.sockets)).getsockname()[1]


async def test_wss_with_unknown_ca_fails_verification(session_wss_server: int) -> None:
    with pytest.raises(ConnectionFailedError, match="certificate") as info:
        await attempt(session_config(f"wss://localhost:{session_wss_server}"))
    assert "--capath" in str(info.value)


async def test_wss_with_verification_off_connects(session_wss_server: int) -> None:
    ws, info = await attempt(session_config(f"wss://localhost:{session_wss_server}", verify_ssl=False))
    await ws.close()
    assert info.channel_id == "tls-chan"


async def test_bad_capath_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="CA certificates"):
        await attempt(session_config("wss://localhost:1", capath="/nonexistent/capath/dir"))


# --- HTTPS_PROXY ------------------------------------------------------------------


async def test_https_proxy_connect_with_basic_auth(session_wss_server: int) -> None:
    async with ConnectProxy("alice", "s3cr:et") as proxy:
        config = session_config(
            f"wss://localhost:{session_wss_server}", verify_ssl=False,
            https_proxy=f"http://alice:s3cr%3Aet@127.0.0.1:{proxy.port}",
        )
        ws, info = await attempt(config)
        await ws.close()
    assert proxy.targets == [f"localhost:{session_wss_server}"]
    assert info.channel_id == "tls-chan"


async def test_tls_proxy_https_scheme(session_wss_server: int, session_ca: trustme.CA) -> None:
    proxy_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    session_ca.issue_cert("127.0.0.1").configure_cert(proxy_tls)
    async with ConnectProxy("carol", "pw", tls=proxy_tls) as proxy:
        config = session_config(
            f"wss://localhost:{session_wss_server}", verify_ssl=False,
            https_proxy=f"https://carol:pw@127.0.0.1:{proxy.port}",
        )
        ws, info = await attempt(config)
        await ws.close()
    assert proxy.targets == [f"localhost:{session_wss_server}"] and info.channel_id == "tls-chan"


async def test_https_proxy_wrong_password(session_wss_server: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="localproxy")
    async with ConnectProxy("alice", "right") as proxy:
        config = session_config(
            f"wss://localhost:{session_wss_server}", verify_ssl=False,
            https_proxy=f"http://alice:wrongpass@127.0.0.1:{proxy.port}",
        )
        with pytest.raises(ConnectionFailedError, match="407") as info:
            await attempt(config)
    assert proxy.targets == []
    assert "wrongpass" not in str(info.value)
    assert all("wrongpass" not in r.getMessage() for r in caplog.records)


def test_proxy_url_defaults() -> None:
    assert normalize_proxy_url("http://proxy.example") == "http://proxy.example:3128"
    assert normalize_proxy_url("proxy.example:8080") == "http://proxy.example:8080"
    assert normalize_proxy_url("http://u:p@10.0.0.1") == "http://u:p@10.0.0.1:3128"
    assert normalize_proxy_url("https://p.example:8443") == "https://p.example:8443"
    for bad in ("socks5://p:1080", "http://", "http://secretuser@host", "http://h:99999"):
        with pytest.raises(UsageError) as info:
            normalize_proxy_url(bad)
        assert "secretuser" not in str(info.value)


# --- Backoff ----------------------------------------------------------------------


def test_backoff_bounded_with_jitter_in_range() -> None:
    backoff = Backoff(100, 2000, 8, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays[0] == pytest.approx(0.1)
    assert delays[8:] == [None, None]
    previous = 0.1
    for delay in delays[1:8]:
        assert delay is not None
        assert 0.1 <= delay <= min(2.0, previous * 3) + 1e-9
        previous = delay
    assert len({round(d, 9) for d in delays[1:8] if d is not None}) > 1  # jittered, not flat


def test_backoff_reaches_cap_and_resets() -> None:
    backoff = Backoff(50, 400, -1, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(d is not None and 0.05 <= d <= 0.4 for d in delays)
    assert max(d for d in delays if d is not None) > 0.3  # grows toward the cap
    backoff.reset()
    assert backoff.attempts == 0 and backoff.next_delay() == pytest.approx(0.05)


def test_backoff_from_settings() -> None:
    backoff = Backoff.from_settings(Settings(retry_delay_ms=200, connect_retry_count=2))
    assert backoff.next_delay() == pytest.approx(0.2)
    assert backoff.next_delay() is not None
    assert backoff.next_delay() is None
    assert Backoff.from_settings(Settings(connect_retry_count=0)).next_delay() is None
    forever = Backoff.from_settings(Settings())
    assert forever.cap == 30.0 and all(forever.next_delay() is not None for _ in range(1000))
    with pytest.raises(ValueError):
        Backoff(-1)


# --- against the emulator ---------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["ws", "wss"])
async def session_emulator(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0, tls=request.param, region="us-east-1") as emulator:
        yield emulator


def emulator_config(emulator: object, token: str, **changes: object) -> ProxyConfig:
    capath = getattr(emulator, "capath")
    return session_config(getattr(emulator, "data_url"), access_token=token, capath=capath, **changes)


async def emulator_attempt(config: ProxyConfig, access_token: str, client_token: str | None):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(
        open_session(config, access_token=access_token, client_token=client_token, open_timeout=5), 10
    )


async def test_emulator_session_both_modes(session_emulator: object, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="localproxy")
    emulator: object = session_emulator
    tunnel = emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    source_ws, source = await emulator_attempt(emulator_config(emulator, tunnel.source_token),
                                               tunnel.source_token, CLIENT_TOKEN)
    destination_config = emulator_config(emulator, tunnel.destination_token, mode=Mode.DESTINATION,
                                         services={"SSH": DestinationTarget(port=22)})
    destination_ws, destination = await emulator_attempt(destination_config, tunnel.destination_token, None)
    try:
        await emulator.wait_connected(tunnel.tunnel_id, "destination", timeout=10)  # type: ignore[attr-defined]
        assert source.subprotocol == destination.subprotocol == V3
        assert source.channel_id and destination.channel_id
        sock = source_ws.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert emulator.describe(tunnel.tunnel_id)["sourceConnectionState"]["status"] == "CONNECTED"  # type: ignore[attr-defined]
    finally:
        await source_ws.close()
        await destination_ws.close()
    url = emulator.data_url  # type: ignore[attr-defined]
    messages = [r.getMessage() for r in caplog.records]
    assert f"Attempting to establish web socket connection with endpoint {url}" in messages
    assert f"Web socket session ID: {source.channel_id}" in messages
    assert f"Successfully established websocket connection with proxy server: {url}" in messages
    assert all(tunnel.source_token not in m and CLIENT_TOKEN not in m for m in messages)


async def test_emulator_reuse_without_client_token_is_used_error(session_emulator: object) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    config = emulator_config(session_emulator, tunnel.source_token, tunnel_id=tunnel.tunnel_id)
    ws, _ = await emulator_attempt(config, tunnel.source_token, None)
    await ws.close()
    with pytest.raises(AccessTokenUsedError) as info:
        await emulator_attempt(config, tunnel.source_token, None)
    assert info.value.exit_code == ExitCode.ACCESS_TOKEN_USED == 3
    assert f"--tunnel-id {tunnel.tunnel_id} --client-mode SOURCE --region eu-west-1" in str(info.value)
    assert tunnel.source_token not in str(info.value)


async def test_emulator_other_client_token_is_mismatch(session_emulator: object) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    config = emulator_config(session_emulator, tunnel.source_token)
    ws, _ = await emulator_attempt(config, tunnel.source_token, CLIENT_TOKEN)
    await ws.close()
    other = "other-" + uuid.uuid4().hex
    with pytest.raises(ClientTokenMismatchError) as info:
        await emulator_attempt(config, tunnel.source_token, other)
    assert info.value.exit_code == ExitCode.CLIENT_TOKEN_MISMATCH == 4
    assert other not in str(info.value) and CLIENT_TOKEN not in str(info.value)
    ws, _ = await emulator_attempt(config, tunnel.source_token, CLIENT_TOKEN)  # the bound one still works
    await ws.close()


async def test_emulator_wrong_mode_and_5xx(session_emulator: object) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    config = emulator_config(session_emulator, tunnel.destination_token)  # source mode, destination token
    with pytest.raises(HandshakeRejectedError) as info:
        await emulator_attempt(config, tunnel.destination_token, CLIENT_TOKEN)
    assert type(info.value) is HandshakeRejectedError and info.value.exit_code == 5
    assert "rotate-tunnel-access-token" in str(info.value)
    session_emulator.fail_next_handshakes(1, status=503)  # type: ignore[attr-defined]
    with pytest.raises(ServiceUnavailableError) as unavailable:
        await emulator_attempt(emulator_config(session_emulator, tunnel.source_token), tunnel.source_token, CLIENT_TOKEN)
    assert unavailable.value.retryable and unavailable.value.exit_code == ExitCode.CONNECTION_FAILED


async def test_emulator_through_connect_proxy(session_emulator: object) -> None:
    tunnel = session_emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    async with ConnectProxy("bob", "pw") as proxy:
        config = emulator_config(session_emulator, tunnel.source_token,
                                 https_proxy=f"http://bob:pw@127.0.0.1:{proxy.port}")
        ws, info = await emulator_attempt(config, tunnel.source_token, CLIENT_TOKEN)
        await ws.close()
    assert len(proxy.targets) == 1 and info.subprotocol == V3
