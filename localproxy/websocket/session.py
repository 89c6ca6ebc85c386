"""One websocket connection attempt to the Secure Tunneling service (PROTOCOL.md 2).

:func:`open_session` sends ``GET /tunnel?local-proxy-mode=...`` with the
``access-token`` / ``client-token`` headers and exactly one subprotocol, over
TLS 1.2+ (system CAs plus ``-c`` capath), directly or through an ``HTTPS_PROXY``
(HTTP CONNECT, basic auth). Every failure becomes a typed error:

=========================================  ===========================================
refused upgrade, body "previously used"    :class:`~localproxy.errors.AccessTokenUsedError`
refused upgrade, body "does not match"     :class:`~localproxy.errors.ClientTokenMismatchError`
other 3xx/4xx                              :class:`~localproxy.errors.HandshakeRejectedError`
5xx                                        :class:`~localproxy.errors.ServiceUnavailableError`
refused/reset/timeout/DNS/TLS/proxy        :class:`~localproxy.errors.ConnectionFailedError`
101 without our subprotocol                :class:`~localproxy.errors.ProtocolError`
=========================================  ===========================================

It logs the reference's lines ``Attempting to establish web socket connection
with endpoint ...``, ``Web socket session ID: ...`` and ``Successfully
established websocket connection with proxy server: ...`` (callers need not
repeat them), and on a refusal ``Proxy server rejected web socket upgrade
request: (HTTP/1.1 400 Bad Request) "<body>"`` (error level; warning for 5xx,
which is retried).

:class:`Backoff` is the sans-I/O reconnect delay policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import sys
import urllib.parse
from typing import TypedDict

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    InvalidHandshake,
    InvalidMessage,
    InvalidProxy,
    InvalidStatus,
    InvalidURI,
    NegotiationError,
    ProxyError,
)
from websockets.typing import Subprotocol
from websockets.version import version as websockets_version

from localproxy._version import __version__
from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    ConfigError,
    ConnectionFailedError,
    LocalProxyError,
    ProtocolError,
    UsageError,
)
from localproxy.records import record
from localproxy.settings import Settings
from localproxy.tokens.source import register_secret
from localproxy.websocket.connection import TunnelConnection

__all__ = [
    "Backoff",
    "SessionInfo",
    "open_session",
    "user_agent",
    "ssl_context",
    "DEFAULT_OPEN_TIMEOUT",
    "DEFAULT_MAX_DELAY_MS",
    "DEFAULT_PROXY_PORT",
]

logger = logging.getLogger("localproxy.session")

DEFAULT_OPEN_TIMEOUT = 10.0  # seconds for TCP + proxy CONNECT + TLS + upgrade
DEFAULT_MAX_DELAY_MS = 30_000  # backoff cap
DEFAULT_PROXY_PORT = 3128  # HTTPS_PROXY without a port (same as the reference)


@record(frozen=True)
class SessionInfo:
    """What the 101 reply told us: the negotiated subprotocol and the channel id."""

    subprotocol: str
    channel_id: str | None


def user_agent() -> str:
    """e.g. ``localproxy-python/0.1.0 python/3.11.7 websockets/17.4 openssl/3.0.19 linux``."""
    python = ".".join(str(part) for part in sys.version_info[:3])
    # "OpenSSL 3.0.19 27 Jan 2026" -> "3.0.19" (OPENSSL_VERSION_INFO hides the 3.x patch)
    library, _, rest = ssl.OPENSSL_VERSION.partition(" ")
    openssl = f"{library.lower()}/{rest.split(' ')[0] or 'unknown'}"
    return (
        f"localproxy-python/{__version__} python/{python} "
        f"websockets/{websockets_version} {openssl} {sys.platform}"
    )


def ssl_context(config: ProxyConfig) -> ssl.SSLContext:
    """TLS 1.2+ with the system CAs plus ``config.capath``; no checks with ``-k``."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.capath:
        # OpenSSL reads a capath lazily and silently ignores a missing one: check it here.
        if not os.path.isdir(config.capath):
            raise ConfigError(f"Cannot load CA certificates from '{config.capath}': not a directory")
        try:
            context.load_verify_locations(capath=config.capath)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"Cannot load CA certificates from '{config.capath}': {exc}") from None
    if not config.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def normalize_proxy_url(text: str) -> str:
    """``http://[user:pass@]host[:port]`` (port 3128 by default) or ``https://...``.

    Raises :class:`UsageError` with a message that never repeats the credentials.
    """
    parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = parsed.port
    except ValueError:
        raise UsageError("Invalid HTTPS_PROXY: bad port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError("Invalid HTTPS_PROXY: expected http://[user:pass@]host[:port] or https://...")
    if parsed.username is not None and parsed.password is None:
        raise UsageError("Invalid HTTPS_PROXY: a user name needs a password (user:pass@host)")
    userinfo = parsed.netloc.rpartition("@")[0]
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    netloc = f"{userinfo}@{host}" if userinfo else host
    return f"{parsed.scheme}://{netloc}:{port or DEFAULT_PROXY_PORT}"


class _ConnectOptions(TypedDict, total=False):
    """The ``connect`` options that depend on the config (proxy, TLS, tunnel socket)."""

    proxy: str | None
    proxy_ssl: ssl.SSLContext
    ssl: ssl.SSLContext
    server_hostname: str
    sock: socket.socket


class _Connect(connect):
    """``connect`` that never follows redirects: they would carry the access token elsewhere."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def open_session(
    config: ProxyConfig,
    *,
    access_token: str,
    client_token: str | None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT,
) -> tuple[TunnelConnection, SessionInfo]:
    """Open one websocket to the service; raise a typed LocalProxyError on failure."""
    settings = config.settings
    url = f"{config.endpoint.url}/tunnel?local-proxy-mode={config.mode.value}"
    headers = [("access-token", access_token)]
    if client_token is not None:
        headers.append(("client-token", client_token))
    kwargs: _ConnectOptions = {"proxy": None}  # config.https_proxy is the only proxy source
    if config.endpoint.tls:
        kwargs["ssl"] = ssl_context(config)
        kwargs["server_hostname"] = config.endpoint.host
    proxy_url = normalize_proxy_url(config.https_proxy) if config.https_proxy else None
    if proxy_url:
        password = urllib.parse.urlsplit(proxy_url).password
        if password:
            register_secret(password)
            register_secret(urllib.parse.unquote(password))
    logger.info("Attempting to establish web socket connection with endpoint %s", config.endpoint.url)
    if proxy_url:
        # Imported here: only runs through a proxy use it (start-up, issue 21).
        from localproxy.websocket.http_connect import open_tunnel_socket, proxy_display

        logger.info("Connecting through HTTPS proxy %s", proxy_display(proxy_url))
    tunnel_socket: socket.socket | None = None
    try:
        async with asyncio.timeout(open_timeout):
            if proxy_url and proxy_url.startswith("https://"):
                # TLS to the proxy itself: websockets' own CONNECT support.
                kwargs["proxy"] = proxy_url
                kwargs["proxy_ssl"] = ssl_context(config)
            elif proxy_url:
                tunnel_socket = await open_tunnel_socket(
                    proxy_url, config.endpoint.host, config.endpoint.port, user_agent=user_agent()
                )
                kwargs["sock"] = tunnel_socket
            ws = await _Connect(
                url,
                additional_headers=headers,
                user_agent_header=user_agent(),
                subprotocols=[Subprotocol(settings.subprotocol)],
                compression=None,
                # Pings keep NATs and load balancers open; the connection declares the link
                # dead only once the service answered a ping (PROTOCOL.md 4.6): see keepalive.py.
                # Data messages go straight to the session's Receiver: connection.py.
                create_connection=TunnelConnection,
                ping_interval=settings.ping_period_ms / 1000 if settings.ping_period_ms > 0 else None,
                ping_timeout=None,
                max_size=max(settings.max_frame_size, 131076),
                write_limit=settings.ws_write_buffer_size,
                open_timeout=None,  # the asyncio.timeout above covers proxy + TLS + upgrade
                **kwargs,
            )
    except BaseException as exc:
        if tunnel_socket is not None:
            tunnel_socket.close()
        if isinstance(exc, LocalProxyError):
            raise
        if isinstance(exc, InvalidStatus):
            raise _rejected(config, exc, access_token, client_token) from None
        if isinstance(exc, Exception):
            raise _failure(config, exc, proxy_url, open_timeout) from exc
        raise

    assert isinstance(ws, TunnelConnection)
    channel_id = ws.response.headers.get("channel-id") if ws.response is not None else None
    info = SessionInfo(subprotocol=ws.subprotocol or "", channel_id=channel_id)
    if info.subprotocol != settings.subprotocol:
        await ws.close()
        raise ProtocolError(
            f"The service accepted the websocket without the subprotocol {settings.subprotocol} "
            f"(it answered '{info.subprotocol or 'none'}'): not a Secure Tunneling endpoint?"
        )
    _tune_socket(ws, settings.ws_socket_receive_buffer)
    if info.channel_id:
        logger.info("Web socket session ID: %s", info.channel_id)
    logger.info("Successfully established websocket connection with proxy server: %s", config.endpoint.url)
    logger.debug("Negotiated subprotocol %s", info.subprotocol)
    return ws, info


def _tune_socket(ws: ClientConnection, receive_buffer: int) -> None:
    """TCP_NODELAY (asyncio and uvloop set it already; small tunnel frames must not wait
    for Nagle) and, if ``receive_buffer`` (``socket_receive_buffer_bytes``) is not 0, a
    fixed kernel receive buffer.

    Left to the kernel (the default), the buffer grows to megabytes (6 MiB on Linux)
    whenever this proxy reads slower than the link brings data: a busy device behind
    a fast relay, or loopback. Those bytes wait in front of every keystroke of every
    connection (measured on loopback: 7 MB, echo p99 20-40 ms), and no scheduler can
    reorder them. A fixed 512 KiB (the kernel doubles it: ~1 MiB unread at most)
    bounds that, and still fills the service's ~800 kB/s cap at round trips up to
    ~0.6 s; it is not the default because it would also cap an uncapped relay far
    away at buffer / round trip (10 MB/s at 100 ms).
    """
    sock = ws.transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if receive_buffer > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    except OSError:  # pragma: no cover - the socket closed under us
        pass


def _rejected(
    config: ProxyConfig, exc: InvalidStatus, access_token: str, client_token: str | None
) -> LocalProxyError:
    # Imported here: only a rejected upgrade needs the advice (start-up, issue 21).
    from localproxy.tokens.advice import rejection_error, sanitize_body

    response = exc.response
    status = response.status_code
    reason = response.reason_phrase or ""
    raw = response.body.decode("utf-8", "replace") if response.body else ""
    body = sanitize_body(raw, secrets=(access_token, client_token))
    level = logging.WARNING if status >= 500 else logging.ERROR
    logger.log(level, 'Proxy server rejected web socket upgrade request: (HTTP/1.1 %d %s) "%s"', status, reason, body)
    # Classified on the raw text: masking could rewrite the words matched.
    return rejection_error(config, status=status, reason=reason, body=body, raw_body=raw, client_token=client_token)


def _failure(config: ProxyConfig, exc: Exception, proxy_url: str | None, timeout: float) -> LocalProxyError:
    where = config.endpoint.url
    if isinstance(exc, (InvalidProxy, InvalidURI)):
        return UsageError(f"Invalid endpoint or proxy address: {type(exc).__name__}")
    if isinstance(exc, NegotiationError):
        return ProtocolError(f"Websocket negotiation with {where} failed: {exc}")
    if isinstance(exc, ProxyError):
        from localproxy.websocket.http_connect import proxy_display

        proxy = proxy_display(proxy_url) if proxy_url else "the proxy"
        detail = str(exc)
        response = getattr(exc, "response", None)
        if response is not None:
            detail = f"HTTP {response.status_code} {response.reason_phrase}"
            if response.status_code == 407:
                detail += " (check the user:pass in HTTPS_PROXY)"
        return ConnectionFailedError(f"HTTPS proxy {proxy} refused to tunnel to {where}: {detail}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectionFailedError(
            f"TLS certificate check of {where} failed: {exc.verify_message or exc.reason}. "
            "Give the CA with -c/--capath DIR (or check the endpoint)."
        )
    if isinstance(exc, ssl.SSLError):
        return ConnectionFailedError(f"TLS handshake with {where} failed: {exc.reason or exc}")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ConnectionFailedError(f"Timed out after {timeout:g} s connecting to {where}")
    if isinstance(exc, socket.gaierror):
        return ConnectionFailedError(f"Cannot resolve {config.endpoint.host}: {exc.strerror or exc}")
    if isinstance(exc, OSError):
        return ConnectionFailedError(f"Cannot connect to {where}: {exc.strerror or exc}")
    if isinstance(exc, (InvalidMessage, InvalidHandshake, EOFError)):
        return ConnectionFailedError(f"Websocket handshake with {where} failed: {type(exc).__name__}: {exc}")
    return ConnectionFailedError(f"Cannot connect to {where}: {type(exc).__name__}: {exc}")


# One generator for every Backoff: a Random holds 2.5 KiB of state, and a process may
# run hundreds of proxies (two Backoffs each).
_SHARED_RNG = random.Random()


class Backoff:
    """Reconnect delays: exponential, decorrelated jitter, bounded count (sans-I/O).

    Each delay is drawn uniformly in ``[base, min(cap, 3 * previous)]`` (the
    "decorrelated jitter" policy), so the first is ``base`` and none is below
    ``base`` (the reference waits ``retry_delay_ms`` flat) or above ``cap``.
    ``retry_count`` delays are handed out, then :meth:`next_delay` returns
    ``None`` (give up); ``-1`` means never give up. :meth:`reset` after a session
    that worked starts over. Delays are in seconds.
    """

    _attempts: int
    _previous: float  # the last delay handed out (seconds), set by reset()

    def __init__(
        self,
        base_ms: float,
        max_ms: float = DEFAULT_MAX_DELAY_MS,
        retry_count: int = -1,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if base_ms < 0 or retry_count < -1:
            raise ValueError("base_ms must be >= 0 and retry_count >= -1")
        self.base = base_ms / 1000
        self.cap = max(max_ms, base_ms) / 1000
        self.retry_count = retry_count
        self._rng = rng or _SHARED_RNG
        self.reset()

    @classmethod
    def from_settings(cls, settings: Settings, *, rng: random.Random | None = None) -> "Backoff":
        """base = ``retry_delay_ms``, cap = 30 s, count = ``connect_retry_count``."""
        return cls(settings.retry_delay_ms, DEFAULT_MAX_DELAY_MS, settings.connect_retry_count, rng=rng)

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempts

    def next_delay(self) -> float | None:
        if self.retry_count != -1 and self._attempts >= self.retry_count:
            return None
        if self._attempts == 0:
            delay = self.base
        else:
            delay = min(self.cap, self._rng.uniform(self.base, self._previous * 3))
        self._attempts += 1
        self._previous = max(delay, self.base)
        return delay

    def reset(self) -> None:
        self._attempts = 0
        self._previous = self.base
