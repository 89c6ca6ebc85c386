"""``Emulator``: the local stand-in for AWS IoT Secure Tunneling, as a library.

One port serves the control API (``POST /``, what boto3 and the aws CLI send) and
the data plane (``GET /tunnel`` websockets). The direct methods (``open_tunnel``,
``rotate``...) run the same operations as the API, with the same validation.
With ``mqtt=True`` tunnel notifications also go out on an embedded MQTT broker
(``emu.mqtt_url``; see ``mqtt.py``), as the service publishes them to devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server

from localproxy.emulator import certs
from localproxy.emulator.api import ControlPlane
from localproxy.emulator.events import EmulatorEvent, EventLog
from localproxy.emulator.faults import CAPPED_SEGMENT_SIZE, Faults
from localproxy.emulator.front import FrontConfig
from localproxy.emulator.mqtt import EmbeddedBroker, NotifyPublisher
from localproxy.emulator.relay import Relay
from localproxy.emulator.server import DataPlane, start_server
from localproxy.emulator.store import Side, Store, Tunnel

logger = logging.getLogger("localproxy.emulator")


@dataclass(frozen=True)
class TunnelInfo:
    tunnel_id: str
    tunnel_arn: str
    source_token: str = field(repr=False)
    destination_token: str = field(repr=False)


def as_side(value: Any) -> Side:
    """``"source"``/``"destination"`` from a string (any case) or an enum holding one."""
    text = str(getattr(value, "value", value)).lower()
    if text in ("source", "src"):
        return "source"
    if text in ("destination", "dst"):
        return "destination"
    raise ValueError(f"side must be 'source' or 'destination', got {value!r}")


class Emulator:
    """``async with Emulator(port=0) as emu:`` serves until the block ends."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        region: str = "us-east-1",
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca_out: str | Path | None = None,
        expiry_check_interval: float = 1.0,
        mqtt: bool | str = False,
        mqtt_port: int = 0,
        bandwidth: float | None = None,
        idle_timeout: float | None = None,
        autotuned_buffers: bool = False,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("give both cert and key, or neither")
        self.host = host
        self.tls = tls or cert is not None
        self.region = region
        self._cert, self._key = cert, key
        self._ca_out = Path(ca_out) if ca_out is not None else None
        self._expiry_check_interval = expiry_check_interval
        self.events = EventLog()
        self.faults = Faults()
        self.faults.set_bandwidth(bandwidth)
        self.store = Store(
            region,
            on_revoked=self._on_revoked,
            on_closed=self._on_closed,
            on_notify=self._on_notify,
            on_opened=lambda tunnel: self.events.emit("tunnel_opened", tunnel.tunnel_id),
        )
        self.relay = Relay(self.store, self.events, self.faults)
        self.relay.bounded_buffers = not autotuned_buffers
        self.control = ControlPlane(self.store)
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (or None)")
        self.front = FrontConfig(http_handler=self.control.handle_http, ws_idle_timeout=idle_timeout)
        self.ca_pem_path: Path | None = None
        self.capath: Path | None = None
        self.port = port
        self._server: Server | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._temp_dir: Path | None = None
        # Notify topic: True runs an embedded broker, "mqtt://host:port" uses an external one.
        self._mqtt_option = mqtt
        self._mqtt_port = mqtt_port
        self.mqtt_broker: EmbeddedBroker | None = None
        self.notify_publisher: NotifyPublisher | None = None

    # --- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # e.g. the port is taken: remove the temporary CA directory
            raise

    async def _start(self) -> None:
        context = None
        if self.tls:
            if self._cert is not None and self._key is not None:
                context = certs.server_context(self._cert, self._key)
            else:
                out = self._ca_out
                if out is None:
                    out = self._temp_dir = Path(tempfile.mkdtemp(prefix="localproxy-emulator-"))
                hosts = list(dict.fromkeys([self.host, "127.0.0.1", "localhost", "::1"]))
                generated = certs.generate(out, [h for h in hosts if h not in ("0.0.0.0", "::", "")])
                self.ca_pem_path, self.capath = generated.ca_pem, generated.capath
                context = certs.server_context(generated.cert_pem, generated.key_pem)
        plane = DataPlane(self.store, self.faults, self.relay, self.events)
        # Capped from the start: real-network segment sizes, so the relay's small receive
        # window in front of the cap works (with loopback's 64 KiB segments it stalls TCP).
        segment_size = CAPPED_SEGMENT_SIZE if self.faults.bytes_per_second is not None else None
        self.relay.shrink_receive_buffers = segment_size is not None
        self._server = await start_server(plane, self.front, self.host, self.port, context, segment_size)
        self.port = self._server.server.sockets[0].getsockname()[1]  # asyncio's: a tuple
        self._expiry_task = asyncio.create_task(self._expire_periodically())
        await self._start_mqtt()
        logger.info("emulator listening: control API %s, data plane %s", self.api_url, self.data_url)

    async def stop(self) -> None:
        await self._stop_mqtt()
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
            self._expiry_task = None
        if self._server is not None:
            # Idle keep-alive API connections (and half-sent heads): nothing to flush.
            for connection in list(self.front.unrouted):
                connection.transport.abort()
            self._server.close()
            await self._server.wait_closed()
            await self.relay.wait_idle()
            self._server = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._expiry_check_interval)
            self.store.expire_due()

    # --- addresses ------------------------------------------------------------

    @property
    def _url_host(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"[{host}]" if ":" in host else host

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._url_host}:{self.port}"

    @property
    def data_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self._url_host}:{self.port}"

    # --- control plane, directly ----------------------------------------------

    def open_tunnel(
        self,
        services: list[str] | None = None,
        thing_name: str | None = None,
        lifetime_minutes: int = 720,
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> TunnelInfo:
        params: dict[str, Any] = {"timeoutConfig": {"maxLifetimeTimeoutMinutes": lifetime_minutes}}
        if services or thing_name is not None:  # no services: a tunnel without destinationConfig
            params["destinationConfig"] = _destination_config(services, thing_name)
        if description is not None:
            params["description"] = description
        if tags:
            params["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        out = self.control.call("OpenTunnel", params)
        return TunnelInfo(out["tunnelId"], out["tunnelArn"], out["sourceAccessToken"], out["destinationAccessToken"])

    def rotate(
        self, tunnel_id: str, mode: str, services: list[str] | None = None, thing_name: str | None = None
    ) -> dict[str, str]:
        """RotateTunnelAccessToken; returns its output (``tunnelArn`` and the new token(s))."""
        params: dict[str, Any] = {"tunnelId": tunnel_id, "clientMode": str(getattr(mode, "value", mode)).upper()}
        if services is not None or thing_name is not None:
            params["destinationConfig"] = _destination_config(services, thing_name)
        result: dict[str, str] = self.control.call("RotateTunnelAccessToken", params)
        return result

    def close_tunnel(self, tunnel_id: str, delete: bool = False) -> None:
        self.control.call("CloseTunnel", {"tunnelId": tunnel_id, "delete": delete})

    def describe(self, tunnel_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.control.call("DescribeTunnel", {"tunnelId": tunnel_id})["tunnel"]
        return result

    def list_tunnels(self, thing_name: str | None = None) -> list[dict[str, Any]]:
        return [t.summary() for t in self.store.tunnels(thing_name)]

    def tunnel(self, tunnel_id: str) -> Tunnel:
        """The live record (tokens included), for white-box checks."""
        return self.store.get(tunnel_id)

    # --- clock ----------------------------------------------------------------

    def advance_time(self, seconds: float) -> None:
        """Move the tunnel clock forward; tunnels past their lifetime close at once."""
        self.store.clock.advance(seconds)
        self.store.expire_due()

    # --- connections ----------------------------------------------------------

    async def wait_connected(self, tunnel_id: str, side: Any, timeout: float = 10) -> None:
        key = as_side(side)
        await self.events.wait_until(lambda: self.relay.peer(tunnel_id, key) is not None, timeout)

    async def wait_disconnected(self, tunnel_id: str, side: Any, timeout: float = 10) -> None:
        key = as_side(side)
        await self.events.wait_until(lambda: self.relay.peer(tunnel_id, key) is None, timeout)

    def sessions(self, tunnel_id: str, side: Any) -> int:
        """Open websockets of that side (a replaced one counts until it has closed)."""
        return self.relay.sessions(tunnel_id, as_side(side))

    def handshake_count(self, tunnel_id: str, side: Any) -> int:
        """Successful upgrades of that side so far."""
        return self.relay.handshake_count(tunnel_id, as_side(side))

    # --- events ---------------------------------------------------------------

    def event_mark(self) -> int:
        return self.events.mark()

    async def wait_event(self, kind: str, *, since: int = 0, timeout: float = 10, **match: Any) -> EmulatorEvent:
        if "side" in match and match["side"] is not None:
            match["side"] = as_side(match["side"])
        return await self.events.wait(kind, since=since, timeout=timeout, **match)

    def notifications(self, thing_name: str) -> list[dict[str, Any]]:
        """Payloads published to ``$aws/things/<thing_name>/tunnels/notify``, oldest first."""
        return [e.detail["payload"] for e in self.events.history if e.kind == "notify" and e.detail.get("thing_name") == thing_name]

    # --- fault injection ------------------------------------------------------

    async def drop(self, tunnel_id: str, side: Any, abort: bool = False) -> None:
        """Close that side's websocket (1001), or with ``abort`` cut its TCP connection."""
        await self.relay.drop(tunnel_id, as_side(side), abort=abort)

    def fail_next_handshakes(self, count: int, status: int = 503) -> None:
        self.faults.fail_next_handshakes(count, status)

    async def send_session_reset(self, tunnel_id: str, side: Any) -> None:
        await self.relay.send_session_reset(tunnel_id, as_side(side))

    async def send_stream_reset(self, tunnel_id: str, side: Any, stream_id: int, service_id: str = "") -> None:
        await self.relay.send_stream_reset(tunnel_id, as_side(side), stream_id, service_id)

    async def inject_raw(self, tunnel_id: str, side: Any, data: bytes) -> None:
        await self.relay.send_raw(tunnel_id, as_side(side), data)

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction of every tunnel at this rate (None: no cap); the real
        service's figure is about 800 kB/s per tunnel (``SERVICE_BANDWIDTH``)."""
        self.faults.set_bandwidth(bytes_per_second)
        self.relay.bandwidth_changed()

    # --- store callbacks ------------------------------------------------------

    def _on_revoked(self, tunnel: Tunnel, sides: list[Side], reason: str) -> None:
        self.events.emit("tokens_rotated", tunnel.tunnel_id, sides=list(sides))
        for side in sides:
            self.relay.kick(tunnel.tunnel_id, side, "access token revoked by rotation")

    def _on_closed(self, tunnel: Tunnel, reason: str) -> None:
        logger.info("tunnel %s closed: %s", tunnel.tunnel_id, reason)
        self.events.emit("tunnel_closed", tunnel.tunnel_id, reason=reason)
        for side in ("source", "destination"):
            self.relay.kick(tunnel.tunnel_id, side, f"tunnel closed: {reason}", reset_other=False)

    def _on_notify(self, thing_name: str, payload: dict[str, object]) -> None:
        self.events.emit("notify", thing_name=thing_name, payload=payload)
        if self.notify_publisher is not None:
            self.notify_publisher.submit(thing_name, payload)

    # --- MQTT notify topic (localproxy.emulator.mqtt) ---------------------------

    @property
    def mqtt_url(self) -> str | None:
        """Where notifications are published: ``mqtt://host:port``, or None without MQTT."""
        if self.mqtt_broker is not None:
            return f"mqtt://{self._url_host}:{self.mqtt_broker.port}"
        return self.notify_publisher.url if self.notify_publisher is not None else None

    async def _start_mqtt(self) -> None:
        option = self._mqtt_option
        if option is False or option is None:
            return
        if option is True:
            self.mqtt_broker = EmbeddedBroker(self.host, self._mqtt_port)
            await self.mqtt_broker.start()
            self.notify_publisher = NotifyPublisher(self.mqtt_broker)
        else:
            self.notify_publisher = NotifyPublisher(str(option))
        logger.info("tunnel notifications published via %s", self.mqtt_url)

    async def _stop_mqtt(self) -> None:
        if self.notify_publisher is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.notify_publisher.drain(), 5)
            await self.notify_publisher.close()
            self.notify_publisher = None
        if self.mqtt_broker is not None:
            await self.mqtt_broker.stop()
            self.mqtt_broker = None


def _destination_config(services: list[str] | None, thing_name: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"services": list(services) if services is not None else None}
    if thing_name is not None:
        config["thingName"] = thing_name
    return config
