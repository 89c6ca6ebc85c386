"""``DeviceAgent``: tunnel notifications in, one destination proxy per tunnel out.

Notifications (from MQTT, or handed in with :meth:`DeviceAgent.handle_notification`)
are handled one at a time, in arrival order. For each, the sans-I/O
:class:`~localproxy.agent.plan.TunnelPlanner` decides; the agent carries out the
decision: every :class:`~localproxy.agent.plan.Stop` is closed and *awaited*
before the :class:`~localproxy.agent.plan.Start` connects, so a rotation never
leaves two destination sessions for one tunnel. Each proxy is the engine's
:class:`~localproxy.proxy.local_proxy.LocalProxy` in this event loop, with its own generated
client token (reconnects within its life reuse the access token). A proxy that
stops by itself (token refused, tunnel closed) is logged and forgotten: the
next rotation brings a new token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Self

from localproxy.agent.events import (
    AgentEvent,
    NotificationIgnored,
    NotificationReceived,
    NotificationRejected,
    ProxyEvent,
    ProxyStarted,
    ProxyStopped,
)
from localproxy.agent.mqtt import MqttLink, MqttSettings
from localproxy.agent.notify import (
    NOTIFY_TOPIC_TEMPLATE,
    InvalidNotification,
    notify_topic,
    parse_notification,
)
from localproxy.agent.plan import (
    Ignore,
    Reject,
    Start,
    Stop,
    StopReason,
    TunnelKey,
    TunnelPlanner,
    WhenFull,
    tunnel_label,
)
from localproxy.agent.stats import AgentCounters
from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import LocalProxyError
from localproxy.events import Event as ProxyEngineEvent
from localproxy.ops.logs import forget_secret, register_secret
from localproxy.ops.stats import AgentStats
from localproxy.proxy.local_proxy import LocalProxy
from localproxy.settings import Settings
from localproxy.tokens.source import generate_client_token
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint

__all__ = ["DEFAULT_MAX_TUNNELS", "DeviceAgent"]

logger = logging.getLogger("localproxy.agent")

DEFAULT_MAX_TUNNELS = 4
QUEUE_LIMIT = 64  # notifications waiting to be handled; more are dropped with a warning

Subscriber = Callable[[AgentEvent], Any]

_STOP_WORDS = {
    StopReason.REPLACED: "replaced by a new access token for the same tunnel",
    StopReason.EVICTED: "evicted: --max-tunnels reached and a newer tunnel needs the slot",
    StopReason.AGENT_STOPPING: "the agent is stopping",
}


class DeviceAgent:
    """``async with DeviceAgent(thing, mqtt, services) as agent:`` serves until the block ends."""

    def __init__(
        self,
        thing_name: str,
        mqtt: MqttSettings | str | None,
        services: Mapping[str, DestinationTarget],
        endpoint: ServiceEndpoint | str | None = None,
        max_tunnels: int = DEFAULT_MAX_TUNNELS,
        proxy_settings: Settings | None = None,
        *,
        when_full: WhenFull | str = WhenFull.EVICT_OLDEST,
        capath: str | None = None,
        verify_ssl: bool = True,
        https_proxy: str | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        self.thing_name = thing_name
        self.mqtt = MqttSettings.parse(mqtt) if isinstance(mqtt, str) else mqtt
        template = self.mqtt.topic_template if self.mqtt is not None else NOTIFY_TOPIC_TEMPLATE
        self.topic = notify_topic(thing_name, template)
        self.endpoint = ServiceEndpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.proxy_settings = proxy_settings if proxy_settings is not None else Settings()
        self.capath = capath
        self.verify_ssl = verify_ssl
        self.https_proxy = https_proxy  # http(s)://[user:pass@]host[:port] for the data plane
        self.close_timeout = close_timeout
        self.planner = TunnelPlanner(services, max_tunnels, WhenFull(when_full))
        self._subscribers: list[Subscriber] = []
        self._proxies: dict[int, LocalProxy] = {}  # generation -> proxy (current ones only)
        self._watchers: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._counters = AgentCounters()

    # --- public API -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start the MQTT subscription (``async with`` does it). Bad TLS files raise ConfigError."""
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        link = None
        if self.mqtt is not None:  # first: it reads the TLS files and may raise
            link = MqttLink(self.mqtt, self.mqtt.client_id or self.thing_name, self.topic, self._enqueue, self._emit)
        self._queue = asyncio.Queue(QUEUE_LIMIT)
        self._tasks.append(loop.create_task(self._dispatch(), name="localproxy-agent-dispatch"))
        if link is not None:
            self._tasks.append(loop.create_task(link.run(), name="localproxy-agent-mqtt"))
        logger.info(
            "Device agent for thing %s (%s): serving %s, at most %d tunnel(s)",
            self.thing_name, self.mqtt.url if self.mqtt is not None else "no MQTT",
            _describe_services(self.planner.services), self.planner.max_tunnels,
        )

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every :mod:`~localproxy.agent.events` event; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    @property
    def tunnels(self) -> dict[TunnelKey, int]:
        """Served tunnels: key -> generation of the running proxy."""
        return self.planner.running

    def stats(self) -> AgentStats:
        """A snapshot of the agent's counters and of each running proxy's (:mod:`localproxy.ops.stats`)."""
        proxies = tuple(proxy.stats() for proxy in self._proxies.values())
        return self._counters.snapshot(len(self.planner.running), proxies)

    def proxy(self, key: TunnelKey) -> LocalProxy | None:
        generation = self.planner.running.get(key)
        return self._proxies.get(generation) if generation is not None else None

    async def handle_notification(self, payload: bytes | str) -> None:
        """Act on one notify payload now (serialised with the MQTT ones)."""
        async with self._lock:
            await self._handle(payload)

    async def close(self) -> None:
        """Stop listening, then close every proxy (awaited)."""
        if self._closed:
            return
        self._closed = True
        link_tasks, dispatch_tasks = self._tasks[1:], self._tasks[:1]
        for task in link_tasks:
            task.cancel()
        if link_tasks:
            await asyncio.wait(link_tasks)
        # Under the lock: a notification being handled finishes (its stops awaited) first.
        async with self._lock:
            for task in dispatch_tasks:
                task.cancel()
            if dispatch_tasks:
                await asyncio.wait(dispatch_tasks)
            stops = self.planner.stop_all()
            await asyncio.gather(*(self._stop(stop) for stop in stops))
        if self._watchers:
            await asyncio.wait(self._watchers)

    # --- notifications -------------------------------------------------------------

    def _enqueue(self, payload: bytes) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            logger.warning("Dropped a tunnel notification: %d are already waiting", QUEUE_LIMIT)
            self._emit(NotificationRejected("too many notifications waiting", kind="queue_full"))

    async def _dispatch(self) -> None:
        assert self._queue is not None
        while True:
            payload = await self._queue.get()
            try:
                await self.handle_notification(payload)
            except Exception:
                logger.exception("Internal error while handling a tunnel notification")

    async def _handle(self, payload: bytes | str) -> None:
        try:
            notification = parse_notification(payload)
        except InvalidNotification as error:
            logger.warning("Rejected a tunnel notification on %s: %s", self.topic, error)
            self._emit(NotificationRejected(str(error)))
            return
        label = "+".join(notification.services) + "@" + notification.region
        logger.info("Received a tunnel notification for %s", label)
        self._emit(NotificationReceived(notification.region, notification.services))
        for action in self.planner.on_valid_notification(notification):
            if isinstance(action, Reject):
                logger.warning("Rejected the tunnel notification for %s: %s", label, action.reason)
                self._emit(NotificationRejected(action.reason, action.services, action.kind))
            elif isinstance(action, Ignore):
                logger.info("Ignored the tunnel notification for %s: %s", label, action.reason)
                self._emit(NotificationIgnored(action.reason, action.services, action.kind))
            elif isinstance(action, Stop):
                await self._stop(action)
            elif isinstance(action, Start):
                self._start(action)

    # --- proxies -----------------------------------------------------------------------

    def _start(self, action: Start) -> None:
        notification = action.notification
        endpoint = self.endpoint or ServiceEndpoint.for_region(
            notification.region, self.proxy_settings.region_endpoint_overrides
        )
        config = ProxyConfig(
            mode=Mode.DESTINATION,
            access_token=notification.access_token,
            # Chosen here, not by the proxy, so that _forget_token can forget it too.
            client_token=generate_client_token(),
            endpoint=endpoint,
            services=action.targets,
            region=notification.region,
            settings=self.proxy_settings,
            capath=self.capath,
            verify_ssl=self.verify_ssl,
            https_proxy=self.https_proxy,
        )
        # Masked only once accepted: rejected and duplicate tokens are never used nor
        # logged, and registering them let a flood of notifications grow the list.
        register_secret(config.access_token)
        register_secret(config.client_token)
        proxy = LocalProxy(config, name=tunnel_label(action.key))
        key, generation = action.key, action.generation
        proxy.subscribe(lambda event: self._on_proxy_event(key, generation, event))
        self._proxies[generation] = proxy
        proxy.start()
        replaces = f" (replaces #{action.replaces})" if action.replaces is not None else ""
        logger.info(
            "Started destination proxy #%d for %s%s: %s -> %s",
            generation, tunnel_label(key), replaces, _describe_services(action.targets), endpoint.url,
        )
        self._emit(ProxyStarted(key, generation, action.replaces))
        watcher = asyncio.get_running_loop().create_task(self._watch(key, generation, proxy))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _stop(self, action: Stop) -> None:
        proxy = self._proxies.pop(action.generation, None)
        if proxy is None:
            return
        label = tunnel_label(action.key)
        logger.info("Stopping destination proxy #%d for %s: %s", action.generation, label, _STOP_WORDS[action.reason])
        try:
            await asyncio.wait_for(proxy.close(), self.close_timeout)
        except TimeoutError:
            logger.error("Destination proxy #%d for %s did not close within %.0f s", action.generation, label, self.close_timeout)
        self._forget_token(proxy)
        self._emit(ProxyStopped(action.key, action.generation, action.reason))

    async def _watch(self, key: TunnelKey, generation: int, proxy: LocalProxy) -> None:
        error: LocalProxyError | None = None
        try:
            await proxy.wait_closed()
        except LocalProxyError as failure:
            error = failure
        except asyncio.CancelledError:
            return
        except Exception as failure:
            logger.exception("Destination proxy #%d for %s crashed", generation, tunnel_label(key))
            error = LocalProxyError(f"internal error: {type(failure).__name__}")
        if not self.planner.on_proxy_ended(key, generation):
            return  # stopped on purpose (replaced, evicted, agent stopping): _stop reports it
        self._proxies.pop(generation, None)
        if error is not None:
            logger.error(
                "Destination proxy #%d for %s failed: %s. Waiting for a new token: rotate the tunnel's "
                "DESTINATION access token with --destination-config thingName=%s,services=%s",
                generation, tunnel_label(key), error, self.thing_name, ",".join(key[1]),
            )
        else:
            logger.info("Destination proxy #%d for %s ended", generation, tunnel_label(key))
        self._forget_token(proxy)  # after its last log line
        reason = StopReason.FAILED if error is not None else StopReason.ENDED
        self._emit(ProxyStopped(key, generation, reason, error))

    def _forget_token(self, proxy: LocalProxy) -> None:
        """Stop masking a stopped proxy's tokens (replaced: revoked by the rotation;
        failed: refused; its client token was its own), unless a running proxy uses them."""
        for token in (proxy.config.access_token, proxy.config.client_token):
            if all(token not in (other.config.access_token, other.config.client_token)
                   for other in self._proxies.values()):
                forget_secret(token)

    def _on_proxy_event(self, key: TunnelKey, generation: int, event: ProxyEngineEvent) -> None:
        self._emit(ProxyEvent(key, generation, event))

    def _emit(self, event: AgentEvent) -> None:
        self._counters.on_event(event)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("Agent event subscriber %r failed", callback)


def _describe_services(services: Mapping[str, DestinationTarget]) -> str:
    return ", ".join(f"{name or '(unnamed)'}={target}" for name, target in services.items())
