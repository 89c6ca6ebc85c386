"""The emulator's MQTT side: an embedded broker and the tunnel notify publisher.

The service publishes a destination token on ``$aws/things/<thing>/tunnels/notify``
(QoS 1) when OpenTunnel has ``destinationConfig.thingName`` and when
RotateTunnelAccessToken rotates DESTINATION or ALL with a ``destinationConfig``::

    {"clientAccessToken": "...", "clientMode": "destination", "region": "us-east-1", "services": ["SSH"]}

:class:`EmbeddedBroker` runs amqtt's broker on loopback (plain TCP, or TLS with
client certificates like AWS IoT). :class:`NotifyPublisher` publishes in order,
either straight into an embedded broker or as a client of an external one
(``mqtt://host:port``). amqtt refuses *client* publishes to ``$`` topics
(MQTT-4.7.2-1), so with it the publisher injects messages broker-side; an
external broker must allow clients to publish to ``$aws/...`` (mosquitto does).
Payloads hold tokens: they are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Self

__all__ = [
    "NOTIFY_TOPIC_TEMPLATE",
    "EmbeddedBroker",
    "NotifyPublisher",
    "notify_payload",
    "notify_topic",
]

logger = logging.getLogger("localproxy.emulator.mqtt")

NOTIFY_TOPIC_TEMPLATE = "$aws/things/{thing}/tunnels/notify"
QOS_1 = 1
SHUTDOWN_TIMEOUT = 10.0


def notify_topic(thing_name: str, template: str = NOTIFY_TOPIC_TEMPLATE) -> str:
    return template.format(thing=thing_name)


def notify_payload(access_token: str, region: str, services: Sequence[str]) -> bytes:
    """The notification as the service sends it (member order and lower-case mode included)."""
    document = {
        "clientAccessToken": access_token,
        "clientMode": "destination",
        "region": region,
        "services": list(services),
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class EmbeddedBroker:
    """``async with EmbeddedBroker() as broker:`` an MQTT 3.1.1 broker on ``broker.url``.

    ``port=0`` picks a free port; :meth:`restart` comes back on the same port
    with no sessions (as a broker restart does). With ``certfile``/``keyfile`` the
    listener speaks TLS (``mqtts://``); ``cafile`` then verifies client certificates.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        cafile: str | None = None,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise ValueError("give both certfile and keyfile, or neither")
        self.host = host
        self.port = port
        self.tls = certfile is not None
        self._certfile, self._keyfile, self._cafile = certfile, keyfile, cafile
        self._broker: Any = None  # amqtt.broker.Broker (imported lazily: optional extra)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        from amqtt.broker import Broker

        _quiet_library_loggers()

        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self._bind_host}:{self.port}", "max_connections": 1000}
        if self.tls:
            listener.update(ssl=True, certfile=self._certfile, keyfile=self._keyfile)
            if self._cafile is not None:
                listener["cafile"] = self._cafile
        config = {
            "listeners": {"default": listener},
            # Anonymous clients, nothing else: no $SYS publisher, no packet logging.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        self._broker = broker
        self.port = _bound_port(broker)
        logger.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            # Cut the clients first: amqtt's shutdown cancels each connection's reader
            # under asyncio.wait_for, and on Python 3.11 a cancel that races an
            # arriving packet is lost, leaving shutdown waiting a whole keepalive.
            _abort_clients(broker)
            try:
                await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
            except TimeoutError:
                logger.warning("embedded MQTT broker on %s did not shut down cleanly", self.url)
            logger.info("embedded MQTT broker on %s stopped", self.url)

    async def restart(self) -> None:
        """Stop (dropping every client and session) and listen again on the same port."""
        await self.stop()
        await self.start()

    async def publish(self, topic: str, payload: bytes, qos: int = QOS_1) -> None:
        """Deliver ``payload`` to the subscribers of ``topic`` (``$`` topics allowed)."""
        if self._broker is None:
            raise RuntimeError("the embedded MQTT broker is not running")
        await self._broker.internal_message_broadcast(topic, payload, qos)

    def subscribers(self, topic: str) -> int:
        """Connected sessions subscribed to exactly ``topic`` (for white-box checks)."""
        if self._broker is None:
            return 0
        return sum(
            1
            for session, _qos in self._broker.subscriptions.get(topic, [])
            if session.transitions.state == "connected"
        )

    @property
    def _bind_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def _quiet_library_loggers() -> None:
    """amqtt (and its state machine library) warn about client quirks at every turn:
    keep them to errors unless the application configured those loggers itself."""
    for name in ("amqtt", "transitions"):
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(logging.ERROR)


def _abort_clients(broker: Any) -> None:
    """Drop every client connection at once (as a crashed broker would)."""
    for _session, handler in list(broker.sessions.values()):
        stream_writer = getattr(getattr(handler, "writer", None), "_writer", None)
        transport = getattr(stream_writer, "transport", None)
        if transport is not None:
            transport.abort()


def _bound_port(broker: Any) -> int:
    # amqtt keeps its listeners' asyncio servers in ``_servers``; no public accessor.
    server = broker._servers["default"].instance
    return int(server.sockets[0].getsockname()[1])


class NotifyPublisher:
    """Publishes tunnel notifications, in submission order, at QoS 1.

    ``NotifyPublisher(broker)`` takes an :class:`EmbeddedBroker` or a broker URL
    (``mqtt://host:port``: a client connection, made on first use and remade
    after an error). :meth:`submit` is synchronous (the emulator's store calls
    it); a task publishes in the background; :meth:`drain` waits for it.
    """

    def __init__(
        self,
        broker: EmbeddedBroker | str,
        *,
        topic_template: str = NOTIFY_TOPIC_TEMPLATE,
        timeout: float = 10.0,
    ) -> None:
        self.broker = broker
        self.topic_template = topic_template
        self.timeout = timeout
        self.published = 0
        self.failed = 0
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None  # aiomqtt.Client while connected to an external broker

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self.broker.url if isinstance(self.broker, EmbeddedBroker) else self.broker

    def submit(self, thing_name: str, payload: Mapping[str, Any] | bytes) -> None:
        """Queue a notification for ``thing_name`` (a dict as the store builds it, or bytes)."""
        if not isinstance(payload, bytes):
            payload = notify_payload(
                str(payload["clientAccessToken"]), str(payload["region"]), list(payload["services"])
            )
        self._queue.put_nowait((notify_topic(thing_name, self.topic_template), payload))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="notify-publisher")

    async def publish(
        self, thing_name: str, access_token: str, region: str, services: Sequence[str]
    ) -> None:
        """Publish one notification now (after any queued ones)."""
        self.submit(thing_name, notify_payload(access_token, region, services))
        await self.drain()

    async def drain(self) -> None:
        """Wait until every submitted notification was handed to the broker (or failed)."""
        await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            try:
                await self._publish(topic, payload)
                self.published += 1
            except Exception as error:  # noqa: BLE001 - keep publishing later ones; never log the payload
                self.failed += 1
                logger.warning("could not publish a tunnel notification on %s via %s: %s", topic, self.url, error)
            finally:
                self._queue.task_done()

    async def _publish(self, topic: str, payload: bytes) -> None:
        if isinstance(self.broker, EmbeddedBroker):
            await self.broker.publish(topic, payload, QOS_1)
            return
        import aiomqtt

        for attempt in range(2):  # a stale connection gets one fresh retry
            client = await self._connect()
            try:
                await client.publish(topic, payload, qos=QOS_1, timeout=self.timeout)
                return
            except aiomqtt.MqttError:
                await self._disconnect()
                if attempt:
                    raise

    async def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        import aiomqtt

        host, port = _host_port(self.broker if isinstance(self.broker, str) else self.broker.url)
        client = aiomqtt.Client(host, port, timeout=self.timeout)
        await client.__aenter__()
        self._client = client
        return client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)


def _host_port(url: str) -> tuple[str, int]:
    scheme, _, rest = url.partition("://")
    if scheme != "mqtt" or not rest:
        raise ValueError(f"expected a broker URL mqtt://host:port, got {url!r}")
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:]
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    return host, int(port_text) if port_text else 1883
