"""The agent's MQTT connection: connect, subscribe (QoS 1), hand payloads over, reconnect.

AWS IoT Core wants TLS on 8883 with the thing's certificate and key, and the
Amazon root CA (port 443 works too, with ALPN ``x-amzn-mqtt-ca``). A local
broker in tests is plain TCP: ``mqtt://host:port`` or ``--no-tls``.

The connection is kept with decorrelated-jitter backoff between attempts
(``localproxy.websocket.session.Backoff``: first retry after ``retry_delay_ms``, then up
to 3x the previous delay, capped at ``max_retry_delay_ms``), reset once a
connection is up and subscribed. Every (re)connect subscribes again, so a
broker that lost its sessions (a restart) still delivers the next
notification. By default the session is persistent (clean session off, client
id = thing name): AWS IoT then queues QoS 1 notifications published while the
device was briefly offline and delivers them on reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

try:
    import aiomqtt
except ImportError:  # the mqtt extra is absent: --help works, running says what to install
    aiomqtt = None  # type: ignore[assignment]

from localproxy.agent.events import AgentEvent, MqttConnected, MqttDisconnected
from localproxy.agent.notify import NOTIFY_TOPIC_TEMPLATE
from localproxy.config.mappings import validate_host
from localproxy.errors import ConfigError, MissingExtraError, UsageError
from localproxy.ops.files import MAX_CONFIG_BYTES, UnsuitableFile, check_regular_file
from localproxy.types import split_host_port
from localproxy.websocket.session import Backoff

__all__ = ["MqttLink", "MqttSettings"]

logger = logging.getLogger("localproxy.agent.mqtt")
# paho-mqtt's own chatter (a line per ping); the CLI opens it at -v 6.
paho_logger = logging.getLogger("localproxy.agent.paho")
paho_logger.setLevel(logging.WARNING)

AWS_IOT_MQTT_PORT = 8883
AWS_IOT_ALPN_PORT = 443
AWS_IOT_ALPN = "x-amzn-mqtt-ca"
_FAILURE = 0x80  # SUBACK return code / reason code "not granted"


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to reach the broker. Paths are read when the agent starts."""

    host: str
    port: int = AWS_IOT_MQTT_PORT
    tls: bool = True
    cert: str | None = None
    key: str | None = None
    root_ca: str | None = None  # None: the system's CA store
    client_id: str | None = None  # None: the thing name
    keepalive: int = 60
    persistent_session: bool = True
    retry_delay_ms: int = 1000
    max_retry_delay_ms: int = 60_000
    timeout: float = 10.0  # connect, subscribe
    topic_template: str = NOTIFY_TOPIC_TEMPLATE

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise UsageError("Give both --cert and --key (the thing's certificate and private key), or neither")
        if not self.tls and (self.cert or self.root_ca):
            raise UsageError("--cert/--key/--root-ca need TLS: drop --no-tls (or mqtt://)")
        if not 0 < self.port <= 65535:
            raise UsageError(f"Invalid MQTT port {self.port}")

    @classmethod
    def parse(cls, text: str, *, tls: bool | None = None, **options: object) -> MqttSettings:
        """``HOST[:PORT]`` (TLS, 8883), ``mqtts://HOST[:PORT]`` or ``mqtt://HOST[:PORT]`` (plain, 1883).

        ``tls=False`` (``--no-tls``) makes a bare ``HOST[:PORT]`` plain (default port 1883).
        """
        rest = text.strip()
        scheme_tls: bool | None = None
        if "://" in rest:
            scheme, _, rest = rest.partition("://")
            if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
                raise UsageError(f"Unsupported MQTT endpoint scheme '{scheme}': use mqtts:// or mqtt://")
            scheme_tls = scheme in ("mqtts", "ssl")
            rest = rest.rstrip("/")
        if scheme_tls is not None and tls is not None and scheme_tls != tls:
            raise UsageError(f"--no-tls contradicts the MQTT endpoint {text}")
        use_tls = scheme_tls if scheme_tls is not None else (tls if tls is not None else True)
        host, port = split_host_port(rest, AWS_IOT_MQTT_PORT if use_tls else 1883, "MQTT port")
        validate_host(host, "MQTT endpoint")
        return cls(host=host, port=port, tls=use_tls, **options)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None without TLS); :class:`ConfigError` for bad files."""
        if not self.tls:
            return None
        for path, what in ((self.cert, "--cert"), (self.key, "--key"), (self.root_ca, "--root-ca")):
            if path is None:
                continue
            # OpenSSL opens them in the event loop: a FIFO would block it, /dev/zero never end.
            try:
                check_regular_file(path, MAX_CONFIG_BYTES)
            except FileNotFoundError:
                raise ConfigError(f"{what}: no such file: {path}") from None
            except (UnsuitableFile, OSError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                raise ConfigError(f"{what}: cannot use {path}: {reason}") from None
        try:
            context = ssl.create_default_context(cafile=self.root_ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None and self.key is not None:
                context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ConfigError(f"Cannot use the MQTT TLS files (--cert/--key/--root-ca): {error}") from None
        if self.port == AWS_IOT_ALPN_PORT:
            context.set_alpn_protocols([AWS_IOT_ALPN])
        return context


class MqttLink:
    """Keeps one subscription alive; ``on_message(payload)`` for each message (sync)."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        topic: str,
        on_message: Callable[[bytes], None],
        emit: Callable[[AgentEvent], None],
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.topic = topic
        self._on_message = on_message
        self._emit = emit
        if aiomqtt is None:
            raise MissingExtraError("the device agent needs the mqtt extra: pip install 'localproxy[mqtt]'")
        self._context = settings.ssl_context()  # fail at start, with a clear error

    async def run(self) -> None:
        """Connect, subscribe, deliver; reconnect forever with backoff. Cancel to stop."""
        settings = self.settings
        backoff = Backoff(settings.retry_delay_ms, settings.max_retry_delay_ms)
        while True:
            try:
                await self._serve_once(backoff)
                reason = "the broker closed the connection"
            except aiomqtt.MqttError as error:
                reason = _describe(error)
            except OSError as error:  # TLS handshake or socket trouble paho did not wrap
                reason = f"{type(error).__name__}: {error}"
            delay = backoff.next_delay() or settings.retry_delay_ms / 1000
            logger.warning("MQTT connection to %s: %s; reconnecting in %.2f s", settings.url, reason, delay)
            self._emit(MqttDisconnected(settings.url, reason, delay))
            await asyncio.sleep(delay)

    async def _serve_once(self, backoff: Backoff) -> None:
        settings = self.settings
        logger.debug("Connecting to MQTT broker %s as client %s", settings.url, self.client_id)
        client = aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=self.client_id,
            clean_session=not settings.persistent_session,
            keepalive=settings.keepalive,
            timeout=settings.timeout,
            tls_context=self._context,
            logger=paho_logger,
        )
        async with client:
            granted = await client.subscribe(self.topic, qos=1)
            # MQTT 3.1.1 grants plain ints, MQTT 5 paho ReasonCode objects
            codes = [code if isinstance(code, int) else code.value for code in granted]
            if not codes or codes[0] >= _FAILURE:
                raise aiomqtt.MqttError(
                    f"the broker refused the subscription to {self.topic} (does the thing's policy allow it?)"
                )
            backoff.reset()
            logger.info("Subscribed to %s on %s (QoS %d)", self.topic, settings.url, codes[0])
            self._emit(MqttConnected(settings.url, self.topic))
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, (bytes, bytearray)):
                    self._on_message(bytes(payload))
                elif isinstance(payload, str):
                    self._on_message(payload.encode("utf-8", "surrogatepass"))
                else:  # paho hands bytes; anything else is not a notification
                    self._on_message(b"")


def _describe(error: aiomqtt.MqttError) -> str:
    text = str(error) or type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text
