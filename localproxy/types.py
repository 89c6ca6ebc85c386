"""Types every layer shares: the proxy's mode, where the service is, what a service maps to.

At the bottom of the package (imports only :mod:`localproxy.errors` and
:mod:`localproxy.records`), so that the tunnel state machine, the I/O layers and the
configuration layer can all use them.
"""

from __future__ import annotations

import enum
from typing import Mapping, Union

from localproxy.errors import UsageError
from localproxy.records import record

# The key of the single unnamed mapping (``-s 5555`` / ``-d 22``): the V1 form,
# serving the tunnel's only service or a tunnel without services.
V1_SERVICE = ""


class Mode(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


@record(frozen=True)
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


@record(frozen=True)
class SourcePort:
    """Source mode: the local TCP port to listen on for a service (0 picks one)."""

    port: int


@record(frozen=True)
class SourceUnixSocket:
    """Source mode: the Unix socket path to listen on for a service (created 0600)."""

    path: str

    def __str__(self) -> str:
        return self.path


@record(frozen=True)
class InProcess:
    """Source mode: no listener; connections come only from ``LocalProxy.open_connection``
    and ``LocalProxy.connect_socket`` (tools that embed the proxy, ``--stdio``)."""


# What a source proxy may serve a service on.
SourceTarget = Union[SourcePort, SourceUnixSocket, InProcess]


@record(frozen=True)
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


ServiceTarget = Union[SourcePort, SourceUnixSocket, InProcess, DestinationTarget]


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
