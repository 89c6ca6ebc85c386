"""The typed, immutable configuration the engine takes.

The CLI (``localproxy.cli``) builds a :class:`ProxyConfig` from argv, files and
the environment; a library user builds the same object directly::

    ProxyConfig(
        mode=Mode.SOURCE,
        access_token=token,
        endpoint=ServiceEndpoint.parse("ws://127.0.0.1:8443"),
        services={"SSH": SourcePort(0)},
    )

Tokens are kept out of ``repr`` so that logging a config never leaks them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

from .errors import UsageError
from .settings import Settings

# The key of the single unnamed mapping (``-s 5555`` / ``-d 22``): the V1 form,
# serving the tunnel's only service or a tunnel without services.
V1_SERVICE = ""


class Mode(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


@dataclass(frozen=True)
class ServiceEndpoint:
    """Where the Secure Tunneling service is: host, port and whether TLS is used."""

    host: str
    port: int = 443
    tls: bool = True

    @property
    def url(self) -> str:
        scheme = "wss" if self.tls else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @classmethod
    def for_region(
        cls, region: str, overrides: Mapping[str, str] | None = None
    ) -> "ServiceEndpoint":
        host = (overrides or {}).get(region) or f"data.tunneling.iot.{region}.amazonaws.com"
        return cls(host=host, port=443, tls=True)

    @classmethod
    def parse(cls, text: str) -> "ServiceEndpoint":
        """``host[:port]`` (TLS), ``wss://host[:port]`` or ``ws://host[:port]``."""
        tls = True
        rest = text
        if "://" in text:
            scheme, _, rest = text.partition("://")
            if scheme not in ("ws", "wss"):
                raise UsageError(f"Unsupported proxy endpoint scheme '{scheme}': use wss:// or ws://")
            tls = scheme == "wss"
            rest = rest.rstrip("/")
        host, port = split_host_port(rest, 443 if tls else 80)
        if not host:
            raise UsageError(f"Invalid proxy endpoint '{text}'")
        return cls(host=host, port=port, tls=tls)


@dataclass(frozen=True)
class SourcePort:
    """Source mode: the local TCP port to listen on for a service (0 picks one)."""

    port: int


@dataclass(frozen=True)
class DestinationTarget:
    """Destination mode: where to connect for a service: host:port or a Unix socket."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return self.unix_path
        host = self.host or "localhost"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


ServiceTarget = Union[SourcePort, DestinationTarget]


@dataclass(frozen=True)
class ProxyConfig:
    """Everything one local proxy needs. Immutable; tokens never in repr."""

    mode: Mode
    access_token: str = field(repr=False)
    endpoint: ServiceEndpoint
    # service id -> target; the key V1_SERVICE ("") is the single unnamed mapping.
    # An empty mapping is allowed for a source proxy (ports picked per service).
    services: Mapping[str, ServiceTarget] = field(default_factory=dict)
    client_token: str | None = field(default=None, repr=False)
    region: str | None = None
    bind_address: str | None = None  # None: settings.default_bind_address
    capath: str | None = None
    verify_ssl: bool = True
    destination_client_type: str | None = None  # None, "V1" or "V2" (source only)
    settings: Settings = field(default_factory=Settings)
    https_proxy: str | None = field(default=None, repr=False)  # may carry user:pass
    # Beyond the reference (token issue): persist a generated client token,
    # rotate the access token when the service refuses it.
    client_token_file: str | None = None
    tunnel_id: str | None = None
    rotate_on_reject: bool = False
    max_rotations: int = 3
    # Service ids of ``services`` that came from --config-dir files: as in the
    # reference, such a mapping is used if the tunnel has that service and is
    # not an error if it does not (a shared ./config may list other services).
    optional_services: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))
        object.__setattr__(self, "optional_services", frozenset(self.optional_services))

    @property
    def effective_bind_address(self) -> str:
        return self.bind_address or self.settings.default_bind_address

    @property
    def subprotocol(self) -> str:
        return self.settings.subprotocol


def split_host_port(text: str, default_port: int, what: str = "port") -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); a bad port is a UsageError."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise UsageError(f"Invalid {what} '{port_text}'")
    return host, int(port_text)
