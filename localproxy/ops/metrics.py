"""Prometheus/OpenMetrics exporter: ``--metrics-port`` of ``localproxy`` and the agent.

Needs the optional ``prometheus_client`` (``pip install 'localproxy[metrics]'``),
imported only when metrics are asked for. Nothing is recorded through it: a
custom collector turns :class:`~localproxy.ops.stats.ProxyStats` /
:class:`~localproxy.ops.stats.AgentStats` snapshots into metric families at scrape
time. prometheus_client serves ``/metrics`` from its own thread; the snapshots
are taken in the event loop (handed over with ``call_soon_threadsafe``), so the
counters are never read while the loop changes them, and a stuck loop shows as
a failed scrape. Labels name tunnels, services, rules and reasons, never a token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from localproxy.errors import ConfigError
from localproxy.ops.logs import redact
from localproxy.ops.stats import AgentStats, ProxyStats

__all__ = ["Gathered", "MetricsServer", "metric_families"]

logger = logging.getLogger("localproxy.metrics")

# What one scrape reports: every proxy's snapshot and, for the agent, its own.
Gathered = tuple[list[ProxyStats], AgentStats | None]
SCRAPE_TIMEOUT = 5.0  # seconds the HTTP thread waits for the event loop
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
    """prometheus_client collector: snapshots taken in the event loop at each scrape."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gather: Callable[[], Gathered]) -> None:
        self._loop = loop
        self._gather = gather

    def describe(self) -> Iterable[Any]:
        return []  # registering must not scrape

    def collect(self) -> Iterator[Any]:
        done: concurrent.futures.Future[Gathered] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(self._gather())
            except BaseException as error:  # noqa: BLE001 - handed to the scraping thread
                done.set_exception(error)

        self._loop.call_soon_threadsafe(take)
        yield from metric_families(done.result(SCRAPE_TIMEOUT))


class MetricsServer:
    """``/metrics`` on ``bind``:``port`` (0 picks a port) for as long as it is open."""

    def __init__(self, bind: str, port: int, gather: Callable[[], Gathered]) -> None:
        self.bind = bind
        self.requested_port = port
        self._gather = gather
        self._server: Any = None
        self.port = 0

    def start(self) -> None:
        """Listen now; a busy port or a bad address raises ConfigError (exit 2)."""
        _prometheus()
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(asyncio.get_running_loop(), self._gather))
        try:
            self._server, _ = start_http_server(self.requested_port, self.bind, registry)
        except OSError as error:
            raise ConfigError(
                f"Cannot serve metrics on {self.bind} port {self.requested_port} (--metrics-port): "
                f"{error.strerror or error}"
            ) from None
        self.port = int(self._server.server_port)
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        logger.info("Serving metrics on http://%s:%d/metrics", host, self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits up to its 0.5 s poll: not in the loop
            server.server_close()
