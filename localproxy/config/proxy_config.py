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

from dataclasses import field
from types import MappingProxyType
from typing import Mapping

from localproxy.records import record
from localproxy.settings import Settings
from localproxy.types import Mode, ServiceEndpoint, ServiceTarget


@record(frozen=True)
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
    # Source: a tunnel service with no mapping listens on a picked port (as the
    # reference does); False: it gets no listener (``InProcess``), e.g. ``--stdio``.
    listen_unmapped: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))
        object.__setattr__(self, "optional_services", frozenset(self.optional_services))

    @property
    def effective_bind_address(self) -> str:
        return self.bind_address or self.settings.default_bind_address

    @property
    def subprotocol(self) -> str:
        return self.settings.subprotocol


def tunnel_label(config: ProxyConfig) -> str:
    """How metrics and JSON logs name a proxy's tunnel: never from a token."""
    if config.tunnel_id:
        return config.tunnel_id
    return f"{config.mode.value}@{config.endpoint.host}:{config.endpoint.port}"
