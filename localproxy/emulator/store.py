"""The emulated service's state: tunnels, access tokens, connection states, clock.

Sans-I/O: no sockets and no event loop. The websocket side (``relay.py``) is told
about tokens revoked and tunnels closed through the callbacks given to ``Store``;
expiry is checked lazily on every access (and by a periodic task in ``core.py``).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

Side = Literal["source", "destination"]
SIDES: tuple[Side, Side] = ("source", "destination")
ACCOUNT_ID = "123456789012"
MAX_SERVICES = 3  # service quota of the real service
DEFAULT_LIFETIME_MINUTES = 720


class ApiError(Exception):
    """An error of the control API: ``code`` becomes the AWS ``__type``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def not_found(tunnel_id: str) -> ApiError:
    return ApiError("ResourceNotFoundException", f"Tunnel {tunnel_id} not found")


class Clock:
    """Wall-clock epoch seconds plus an offset that ``advance`` moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        self.offset += seconds


def new_access_token() -> str:
    # Real CATs are long opaque strings; 192 random bytes -> 256 URL-safe characters.
    return secrets.token_urlsafe(192)


@dataclass(eq=False)
class AccessToken:
    value: str = field(repr=False)
    tunnel_id: str
    side: Side
    revoked: bool = False
    spent: bool = False  # a handshake without client token succeeded: single-use, now used
    client_token: str | None = field(default=None, repr=False)  # bound by the first handshake


@dataclass
class ConnectionState:
    status: str  # CONNECTED / DISCONNECTED
    last_updated_at: float

    def to_json(self) -> dict[str, object]:
        return {"status": self.status, "lastUpdatedAt": self.last_updated_at}


@dataclass(eq=False)
class Tunnel:
    tunnel_id: str
    tunnel_arn: str
    seq: int  # creation order, for newest-first listing and stable paging
    description: str | None
    thing_name: str | None
    services: list[str] | None  # None: OpenTunnel had no destinationConfig
    lifetime_minutes: int
    tags: dict[str, str]
    created_at: float
    last_updated_at: float
    status: str = "OPEN"
    closed_reason: str = ""
    tokens: dict[str, AccessToken] = field(default_factory=dict)  # side -> current token
    states: dict[str, ConnectionState] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        return self.created_at + self.lifetime_minutes * 60

    @property
    def service_ids(self) -> list[str]:
        return list(self.services or [])

    def describe(self) -> dict[str, object]:
        """The ``tunnel`` member of DescribeTunnel's output."""
        out: dict[str, object] = {
            "tunnelId": self.tunnel_id,
            "tunnelArn": self.tunnel_arn,
            "status": self.status,
            "sourceConnectionState": self.states["source"].to_json(),
            "destinationConnectionState": self.states["destination"].to_json(),
        }
        if self.description is not None:
            out["description"] = self.description
        if self.services is not None:
            config: dict[str, object] = {"services": list(self.services)}
            if self.thing_name is not None:
                config["thingName"] = self.thing_name
            out["destinationConfig"] = config
        out["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": self.lifetime_minutes}
        if self.tags:
            out["tags"] = [{"key": k, "value": v} for k, v in self.tags.items()]
        out["createdAt"] = self.created_at
        out["lastUpdatedAt"] = self.last_updated_at
        return out

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "tunnelId": self.tunnel_id,
            "tunnelArn": self.tunnel_arn,
            "status": self.status,
        }
        if self.description is not None:
            out["description"] = self.description
        out["createdAt"] = self.created_at
        out["lastUpdatedAt"] = self.last_updated_at
        return out


# Callbacks to the I/O side. Revoked: (tunnel, sides, reason). Closed: (tunnel, reason).
# Notify: (thing_name, payload) - what the service publishes on $aws/things/<thing>/tunnels/notify,
# on OpenTunnel with a thingName and on a DESTINATION/ALL rotation whose destinationConfig has one.
RevokedCallback = Callable[[Tunnel, list[Side], str], None]
ClosedCallback = Callable[[Tunnel, str], None]
NotifyCallback = Callable[[str, dict[str, object]], None]


def _ignore(*_args: object) -> None:
    return None


class Store:
    """All tunnels and tokens of one emulated account in one region."""

    def __init__(
        self,
        region: str = "us-east-1",
        clock: Clock | None = None,
        on_revoked: RevokedCallback = _ignore,
        on_closed: ClosedCallback = _ignore,
        on_notify: NotifyCallback = _ignore,
        on_opened: Callable[[Tunnel], object] = _ignore,  # the result is ignored
    ) -> None:
        self.region = region
        self.clock = clock or Clock()
        self.on_revoked = on_revoked
        self.on_closed = on_closed
        self.on_notify = on_notify
        self.on_opened = on_opened
        self._tunnels: dict[str, Tunnel] = {}  # deleted tunnels are removed
        self._tokens: dict[str, AccessToken] = {}  # every token issued for a live tunnel
        self._seq = 0

    # --- tunnels --------------------------------------------------------------

    def open_tunnel(
        self,
        *,
        services: list[str] | None = None,
        thing_name: str | None = None,
        lifetime_minutes: int = DEFAULT_LIFETIME_MINUTES,
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Tunnel:
        check_services(services)
        now = self.clock.now()
        self._seq += 1
        tunnel_id = str(uuid.uuid4())
        tunnel = Tunnel(
            tunnel_id=tunnel_id,
            tunnel_arn=f"arn:aws:iot:{self.region}:{ACCOUNT_ID}:tunnel/{tunnel_id}",
            seq=self._seq,
            description=description,
            thing_name=thing_name,
            services=list(services) if services is not None else None,
            lifetime_minutes=lifetime_minutes,
            tags=dict(tags or {}),
            created_at=now,
            last_updated_at=now,
            states={side: ConnectionState("DISCONNECTED", now) for side in SIDES},
        )
        self._tunnels[tunnel_id] = tunnel
        for side in SIDES:
            self._issue(tunnel, side)
        self.on_opened(tunnel)
        self._notify_destination(tunnel)
        return tunnel

    def get(self, tunnel_id: str) -> Tunnel:
        self.expire_due()
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            raise not_found(tunnel_id)
        return tunnel

    def by_arn(self, arn: str) -> Tunnel:
        self.expire_due()
        prefix, _, tunnel_id = arn.rpartition(":tunnel/")
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None or tunnel.tunnel_arn != arn:
            raise ApiError("ResourceNotFoundException", f"Resource {arn} not found")
        return tunnel

    def tunnels(self, thing_name: str | None = None) -> list[Tunnel]:
        """Newest first."""
        self.expire_due()
        found = [t for t in self._tunnels.values() if thing_name is None or t.thing_name == thing_name]
        return sorted(found, key=lambda t: t.seq, reverse=True)

    def close(self, tunnel_id: str, *, delete: bool = False, reason: str = "closed by CloseTunnel") -> None:
        tunnel = self.get(tunnel_id)
        if tunnel.status == "OPEN":
            self._close(tunnel, reason)
        if delete:
            del self._tunnels[tunnel_id]
            for token in list(self._tokens.values()):
                if token.tunnel_id == tunnel_id:
                    del self._tokens[token.value]

    def _close(self, tunnel: Tunnel, reason: str) -> None:
        tunnel.status = "CLOSED"
        tunnel.closed_reason = reason
        tunnel.last_updated_at = self.clock.now()
        self.on_closed(tunnel, reason)

    def expire_due(self) -> list[Tunnel]:
        """Close every OPEN tunnel whose lifetime is over; return them."""
        now = self.clock.now()
        expired = [t for t in self._tunnels.values() if t.status == "OPEN" and now >= t.expires_at]
        for tunnel in expired:
            minutes = tunnel.lifetime_minutes
            self._close(tunnel, f"expired after {minutes} minute{'' if minutes == 1 else 's'}")
        return expired

    # --- tokens ---------------------------------------------------------------

    def rotate(
        self,
        tunnel_id: str,
        client_mode: str,
        *,
        services: list[str] | None = None,
        thing_name: str | None = None,
    ) -> dict[str, str]:
        """Revoke and reissue the tokens of ``client_mode``; return the new ones by output name."""
        if client_mode not in ("SOURCE", "DESTINATION", "ALL"):
            raise ApiError("ValidationException", f"Invalid clientMode {client_mode!r}")
        if client_mode == "SOURCE" and (services is not None or thing_name is not None):
            raise ApiError(
                "InvalidRequestException", "destinationConfig can not be used with clientMode SOURCE"
            )
        tunnel = self.get(tunnel_id)
        if tunnel.status != "OPEN":
            raise ApiError("InvalidRequestException", f"Tunnel {tunnel_id} is closed ({tunnel.closed_reason})")
        if services is not None:
            check_services(services)
            tunnel.services = list(services)
            tunnel.thing_name = thing_name
        sides: list[Side] = ["source", "destination"] if client_mode == "ALL" else [client_mode.lower()]  # type: ignore[list-item]
        for side in sides:
            tunnel.tokens[side].revoked = True
        new = {f"{side}AccessToken": self._issue(tunnel, side).value for side in sides}
        tunnel.last_updated_at = self.clock.now()
        self.on_revoked(tunnel, sides, f"{client_mode} access token rotated")
        if "destination" in sides and services is not None:
            # Published only when the request names the destination (destinationConfig).
            self._notify_destination(tunnel)
        return new

    def _issue(self, tunnel: Tunnel, side: Side) -> AccessToken:
        token = AccessToken(value=new_access_token(), tunnel_id=tunnel.tunnel_id, side=side)
        tunnel.tokens[side] = token
        self._tokens[token.value] = token
        return token

    def find_token(self, value: str) -> AccessToken | None:
        self.expire_due()
        return self._tokens.get(value)

    def tunnel_of(self, token: AccessToken) -> Tunnel | None:
        return self._tunnels.get(token.tunnel_id)

    def _notify_destination(self, tunnel: Tunnel) -> None:
        if tunnel.thing_name:
            payload: dict[str, object] = {
                "clientAccessToken": tunnel.tokens["destination"].value,
                "clientMode": "destination",
                "region": self.region,
                "services": tunnel.service_ids,
            }
            self.on_notify(tunnel.thing_name, payload)

    # --- connection states ----------------------------------------------------

    def set_connected(self, tunnel_id: str, side: Side, connected: bool) -> None:
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return
        now = self.clock.now()
        tunnel.states[side] = ConnectionState("CONNECTED" if connected else "DISCONNECTED", now)
        tunnel.last_updated_at = now

    # --- tags -----------------------------------------------------------------

    def tag(self, arn: str, tags: Iterable[tuple[str, str]]) -> None:
        tunnel = self.by_arn(arn)
        merged = dict(tunnel.tags)
        merged.update(tags)
        if len(merged) > 200:
            raise ApiError("LimitExceededException", "A tunnel can have at most 200 tags")
        tunnel.tags = merged
        tunnel.last_updated_at = self.clock.now()

    def untag(self, arn: str, keys: Iterable[str]) -> None:
        tunnel = self.by_arn(arn)
        for key in keys:
            tunnel.tags.pop(key, None)
        tunnel.last_updated_at = self.clock.now()


def check_services(services: list[str] | None) -> None:
    if services is None:
        return
    if len(services) > MAX_SERVICES:
        raise ApiError(
            "LimitExceededException",
            f"A tunnel can have at most {MAX_SERVICES} services, got {len(services)}",
        )
    if len(set(services)) != len(services):
        raise ApiError("InvalidRequestException", "The services of a tunnel must be unique")
