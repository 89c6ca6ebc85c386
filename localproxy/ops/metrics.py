"""Prometheus/OpenMetrics exporter: ``--metrics-port`` of ``localproxy`` and the agent.

Needs the optional ``prometheus_client`` (``pip install 'localproxy[metrics]'``),
imported only when metrics are asked for. Nothing is recorded through it: a
custom collector turns :class:`~localproxy.ops.stats.ProxyStats` /
:class:`~localproxy.ops.stats.AgentStats` snapshots into metric families at scrape
time. ``/metrics`` is served from the event loop itself by a small bounded HTTP
server (:mod:`localproxy.ops.http_server`: no thread per connection, a header
timeout, a connection cap), so the counters are never read while the loop
changes them, and a stuck loop shows as a failed scrape. prometheus_client
still writes the exposition (text or OpenMetrics, as the scraper's ``Accept``
asks). Labels name tunnels, services, rules and reasons, never a token.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from localproxy.errors import ConfigError
from localproxy.ops.http_server import BoundedHttpServer, HttpReply, listening_socket
from localproxy.ops.logs import redact
from localproxy.ops.stats import AgentStats, ProxyStats

__all__ = ["Gathered", "MetricsServer", "metric_families"]

logger = logging.getLogger("localproxy.metrics")

# What one scrape reports: every proxy's snapshot and, for the agent, its own.
Gathered = tuple[list[ProxyStats], AgentStats | None]
MISSING_LIBRARY = (
    "--metrics-port needs the prometheus_client package: pip install 'localproxy[metrics]'"
)


def _prometheus() -> Any:
    try:
        import prometheus_client.core
    except ImportError:
        raise ConfigError(MISSING_LIBRARY) from None
    return prometheus_client.core


# key, type, name (counters get "_total"), help, labels
_PROXY_FAMILIES = (
    ("connected", "gauge", "localproxy_websocket_connected", "1 while the websocket session to the service is up",
     ("tunnel", "mode")),
    ("sessions", "counter", "localproxy_websocket_sessions", "Websocket sessions established", ("tunnel", "mode")),
    ("reconnects", "counter", "localproxy_websocket_reconnects", "Websocket sessions established after the first",
     ("tunnel", "mode")),
    ("refusals", "counter", "localproxy_handshake_refusals", "Websocket upgrades the service refused, by class",
     ("tunnel", "mode", "class")),
    ("failures", "counter", "localproxy_connect_failures", "Connection attempts lost to network, TLS or proxy errors",
     ("tunnel", "mode")),
    ("active", "gauge", "localproxy_local_connections", "Local connections open now", ("tunnel", "service")),
    ("started", "counter", "localproxy_local_connections_started", "Local connections started", ("tunnel", "service")),
    ("rejected", "counter", "localproxy_local_connections_rejected", "Local connections refused, by reason",
     ("tunnel", "reason")),
    ("received", "counter", "localproxy_tunnel_received_bytes", "Bytes from the tunnel written to local applications",
     ("tunnel", "service")),
    ("sent", "counter", "localproxy_tunnel_sent_bytes", "Bytes read from local applications sent into the tunnel",
     ("tunnel", "service")),
    ("dropped", "counter", "localproxy_tunnel_frames_dropped", "Tunnel frames not acted on, by rule", ("tunnel", "rule")),
    ("rtt", "gauge", "localproxy_websocket_ping_rtt_seconds", "Round trip time of the last websocket ping answered",
     ("tunnel",)),
)


def metric_families(gathered: Gathered) -> list[Any]:
    """The metric families of one scrape (prometheus_client ``Metric`` objects)."""
    core = _prometheus()
    kinds = {"gauge": core.GaugeMetricFamily, "counter": core.CounterMetricFamily}
    family = {key: kinds[kind](name, text, labels=list(labels)) for key, kind, name, text, labels in _PROXY_FAMILIES}
    proxies, agent = gathered
    for stats in proxies:
        tunnel, mode = redact(stats.tunnel), stats.mode  # an embedder's name could hold a secret
        family["connected"].add_metric([tunnel, mode], 1 if stats.connected else 0)
        family["sessions"].add_metric([tunnel, mode], stats.sessions)
        family["reconnects"].add_metric([tunnel, mode], stats.reconnects)
        for kind, count in stats.handshake_refusals.items():
            family["refusals"].add_metric([tunnel, mode, kind], count)
        family["failures"].add_metric([tunnel, mode], stats.connect_failures)
        # Every served service, even when idle: a series that appears late hides its first rate.
        services = set(stats.services) | set(stats.active_connections) | set(stats.connections)
        for service in sorted(services | set(stats.bytes_sent) | set(stats.bytes_received)):
            family["active"].add_metric([tunnel, service], stats.active_connections.get(service, 0))
            family["started"].add_metric([tunnel, service], stats.connections.get(service, 0))
            family["received"].add_metric([tunnel, service], stats.bytes_received.get(service, 0))
            family["sent"].add_metric([tunnel, service], stats.bytes_sent.get(service, 0))
        for reason, count in sorted(stats.connections_rejected.items()):
            family["rejected"].add_metric([tunnel, reason], count)
        for rule, count in sorted(stats.frames_dropped.items()):
            family["dropped"].add_metric([tunnel, rule], count)
        if stats.ping_rtt is not None:
            family["rtt"].add_metric([tunnel], stats.ping_rtt)
    families = list(family.values())
    if agent is not None:
        families += _agent_families(core, agent)
    return families


def _agent_families(core: Any, agent: AgentStats) -> list[Any]:
    mqtt = core.GaugeMetricFamily("localproxy_agent_mqtt_connected", "1 while subscribed at the MQTT broker",
                                  value=1 if agent.mqtt_connected else 0)
    tunnels = core.GaugeMetricFamily("localproxy_agent_tunnels", "Tunnels served now", value=agent.tunnels)
    started = core.CounterMetricFamily("localproxy_agent_proxies_started", "Destination proxies started",
                                       value=agent.proxies_started)
    notifications = core.CounterMetricFamily("localproxy_agent_notifications", "Tunnel notifications, by outcome",
                                             labels=["outcome", "reason"])
    for (outcome, reason), count in sorted(agent.notifications.items()):
        notifications.add_metric([outcome, reason], count)
    return [mqtt, tunnels, started, notifications]


class _Collector:
    """prometheus_client collector: a snapshot taken at each scrape (in the event loop)."""

    def __init__(self, gather: Callable[[], Gathered]) -> None:
        self._gather = gather

    def describe(self) -> Iterable[Any]:
        return []  # registering must not scrape

    def collect(self) -> Iterator[Any]:
        yield from metric_families(self._gather())


class MetricsServer:
    """``/metrics`` on ``bind``:``port`` (0 picks a port) for as long as it is open.

    Served in the running event loop by :class:`~localproxy.ops.http_server.BoundedHttpServer`
    (header timeout, connection cap), in prometheus_client's exposition formats.
    """

    def __init__(self, bind: str, port: int, gather: Callable[[], Gathered]) -> None:
        self.bind = bind
        self.requested_port = port
        self._gather = gather
        self._registry: Any = None
        self._server: BoundedHttpServer | None = None
        self._starting: asyncio.Task[None] | None = None
        self.port = 0

    def start(self) -> None:
        """Listen now (the socket is bound before this returns; requests are served once
        the loop runs); a busy port or a bad address raises ConfigError (exit 2)."""
        _prometheus()
        from prometheus_client import CollectorRegistry

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self._gather))
        try:
            sock = listening_socket(self.bind, self.requested_port)
        except OSError as error:
            raise ConfigError(
                f"Cannot serve metrics on {self.bind} port {self.requested_port} (--metrics-port): "
                f"{error.strerror or error}"
            ) from None
        self.port = int(sock.getsockname()[1])
        self._server = BoundedHttpServer(sock, self._answer)
        self._starting = asyncio.get_running_loop().create_task(self._server.start())
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        logger.info("Serving metrics on http://%s:%d/metrics", host, self.port)

    @property
    def server(self) -> BoundedHttpServer | None:
        return self._server

    def _answer(self, target: str, headers: dict[str, str]) -> HttpReply:
        from prometheus_client.exposition import choose_encoder, gzip_accepted

        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return 404, [("Content-Type", "text/plain; charset=utf-8")], b"Metrics are served at /metrics\n"
        try:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(self._registry)
        except Exception:  # a bug in a snapshot: a failed scrape, not a dead exporter
            logger.exception("Metrics scrape failed")
            return 500, [("Content-Type", "text/plain; charset=utf-8")], b"Scrape failed\n"
        reply_headers = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=1)
            reply_headers.append(("Content-Encoding", "gzip"))
        return 200, reply_headers, body

    async def close(self) -> None:
        server, self._server = self._server, None
        starting, self._starting = self._starting, None
        if starting is not None:
            await asyncio.wait([starting])
        if server is not None:
            await server.close()
