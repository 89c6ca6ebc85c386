"""What the programs (``localproxy``, ``localproxy-agent``) add for operators around the library.

The programs wire it up (:mod:`localproxy.serve`, :mod:`localproxy.agent.cli`); this
module knows statistics, not proxies or agents, so nothing here imports upward.

For one run: the ``--metrics-port`` exporter (:mod:`localproxy.ops.metrics`) and the
systemd notifications (:mod:`localproxy.ops.sdnotify`): ``READY=1`` once the proxy's
tunnel is ready (the agent: once subscribed at the broker), ``STATUS=`` lines
when the connection state changes, ``WATCHDOG=1`` from the event loop, and
``STOPPING=1`` on the way out. Without ``--metrics-port`` no metrics code is
imported; without ``NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from localproxy.ops.sdnotify import ServiceNotifier, watchdog_interval
from localproxy.ops.stats import AgentStats, ProxyStats
from localproxy.records import record

if TYPE_CHECKING:
    from localproxy.ops.metrics import Gathered, MetricsServer

__all__ = ["OpsOptions", "Operations", "agent_status", "proxy_status"]

DEFAULT_METRICS_BIND = "127.0.0.1"


@record(frozen=True)
class OpsOptions:
    """``--metrics-port`` (None: no exporter; 0 picks a port) and ``--metrics-bind``."""

    metrics_port: int | None = None
    metrics_bind: str = DEFAULT_METRICS_BIND


class Operations:
    """The exporter and the service-manager link of one program run."""

    def __init__(
        self,
        options: OpsOptions,
        gather: Callable[[], "Gathered"],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.options = options
        self._gather = gather
        self._environ = environ
        self.metrics_port: int | None = None  # the bound port, once serving
        self._metrics: MetricsServer | None = None
        self._notifier: ServiceNotifier | None = None
        self._ready = False
        self._status = ""

    async def start(self) -> None:
        """Serve metrics (ConfigError if the port is busy), then talk to the service manager."""
        if self.options.metrics_port is not None:
            from localproxy.ops.metrics import MetricsServer

            metrics = MetricsServer(self.options.metrics_bind, self.options.metrics_port, self._gather)
            metrics.start()
            self._metrics = metrics
            self.metrics_port = metrics.port
        self._notifier = ServiceNotifier.from_environment(self._environ)
        if self._notifier is not None:
            self._notifier.start_watchdog(watchdog_interval(self._environ))

    def report(self, ready: bool, status: str) -> None:
        """Tell the service manager: READY=1 the first time ``ready`` (once only), STATUS= when it changed."""
        notifier = self._notifier
        if notifier is None:
            return
        fields: dict[str, str] = {}
        if ready and not self._ready:
            self._ready = True
            fields["READY"] = "1"
        if status != self._status:
            self._status = status
            fields["STATUS"] = status
        if fields:
            notifier.notify(**fields)

    async def close(self) -> None:
        if self._notifier is not None:
            self._notifier.notify(STOPPING="1", STATUS="stopping")
            self._notifier.close()
            self._notifier = None
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            await metrics.close()


def proxy_status(stats: ProxyStats, services: tuple[str, ...] = ()) -> str:
    """``source connected (SSH, VNC)``, ``destination connecting``, ``... disconnected, reconnecting``."""
    if stats.connected:
        named = ", ".join(s for s in services if s)
        return f"{stats.mode} connected" + (f" ({named})" if named else "")
    if stats.sessions == 0:
        return f"{stats.mode} connecting"
    return f"{stats.mode} disconnected, reconnecting"


def agent_status(stats: AgentStats) -> str:
    """``2 tunnels, 2 destinations connected, MQTT connected``."""
    connected = sum(1 for proxy in stats.proxies if proxy.connected)
    tunnels = f"{stats.tunnels} tunnel" + ("" if stats.tunnels == 1 else "s")
    if stats.tunnels == 1:
        destinations = "destination connected" if connected else "destination not connected"
    else:
        destinations = f"{connected} destination" + ("" if connected == 1 else "s") + " connected"
    mqtt = "MQTT connected" if stats.mqtt_connected else "MQTT not connected"
    return f"{tunnels}, {destinations}, {mqtt}"
