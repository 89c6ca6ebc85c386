"""Service mapping vs. the tunnel's services (PROTOCOL.md 4.1), sans-I/O.

:func:`resolve_services` turns the configured mapping (``-s``/``-d``/
``--config-dir``) and the SERVICE_IDS the service sent into the mapping the
tunnel serves, keyed by the service id used on the wire, or raises a
:class:`~localproxy.errors.ConfigError` whose message tells the user what to fix.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from localproxy.errors import ConfigError
from localproxy.types import (
    V1_SERVICE,
    DestinationTarget,
    InProcess,
    Mode,
    ServiceTarget,
    SourcePort,
    SourceUnixSocket,
)

__all__ = ["resolve_services"]


def _names(ids: Sequence[str]) -> str:
    return ", ".join(ids) if ids else "none"


def resolve_services(
    mode: Mode,
    configured: Mapping[str, ServiceTarget],
    tunnel_ids: Sequence[str] | None,
    *,
    unmapped: ServiceTarget = SourcePort(0),
) -> dict[str, ServiceTarget]:
    """Return ``{wire service id: target}`` for the services this proxy serves.

    ``tunnel_ids`` is the SERVICE_IDS list (V2/V3), or ``None`` on a V1 session
    where no service ids exist (the single mapping is then served as "").
    Source mode serves a tunnel service with no mapping on ``unmapped`` (a picked
    free port, ``SourcePort(0)``, or ``InProcess()`` for a proxy that must open no
    port, e.g. ``--stdio``); destination mode needs a target for every tunnel service.
    """
    _check_target_types(mode, configured)
    if tunnel_ids is None:
        return _resolve_v1(mode, configured, unmapped)
    ids = list(dict.fromkeys(tunnel_ids))  # de-duplicated, service order kept
    if V1_SERVICE in configured:
        if len(configured) > 1:
            raise ConfigError("An unnamed mapping cannot be mixed with named services: name them all")
        if len(ids) > 1:
            example = ",".join(f"{s}=..." for s in ids)
            flag = "-s" if mode is Mode.SOURCE else "-d"
            raise ConfigError(
                f"The tunnel has several services ({_names(ids)}): a single unnamed mapping cannot "
                f"choose one. Name each service, e.g. {flag} {example}"
            )
        return {ids[0] if ids else V1_SERVICE: configured[V1_SERVICE]}
    unknown = [service for service in configured if service not in ids]
    if unknown:
        raise ConfigError(
            f"Service id(s) {_names(unknown)} given to the local proxy are not services of the "
            f"tunnel (the tunnel has: {_names(ids)}). Use the service ids given to OpenTunnel"
            + ("" if ids else ", or a single unnamed mapping for a tunnel without services")
        )
    if mode is Mode.DESTINATION:
        missing = [service for service in ids if service not in configured]
        if missing:
            raise ConfigError(
                f"No destination is configured for the tunnel's service(s) {_names(missing)}: "
                f"add e.g. -d {missing[0]}=host:port (or a line in --config-dir)"
            )
        if not ids:
            raise ConfigError("No destination is configured: give -d port or -d host:port")
    resolved: dict[str, ServiceTarget] = {service: configured.get(service, unmapped) for service in ids}
    if not ids:  # a tunnel without services, source mode with no mapping: one picked port
        resolved[V1_SERVICE] = unmapped
    return resolved


def _resolve_v1(
    mode: Mode, configured: Mapping[str, ServiceTarget], unmapped: ServiceTarget
) -> dict[str, ServiceTarget]:
    if len(configured) > 1:
        raise ConfigError(
            f"The V1 protocol carries a single service, but {len(configured)} are configured "
            f"({_names(list(configured))}): configure one, or use subprotocol V2/V3"
        )
    if not configured:
        if mode is Mode.DESTINATION:
            raise ConfigError("No destination is configured: give -d port or -d host:port")
        return {V1_SERVICE: unmapped}
    return {V1_SERVICE: next(iter(configured.values()))}


def _check_target_types(mode: Mode, configured: Mapping[str, ServiceTarget]) -> None:
    expected: tuple[type, ...] = (
        (SourcePort, SourceUnixSocket, InProcess) if mode is Mode.SOURCE else (DestinationTarget,)
    )
    for service, target in configured.items():
        if not isinstance(target, expected):
            shown = service or "(unnamed)"
            names = " or ".join(kind.__name__ for kind in expected)
            raise ConfigError(f"Service {shown}: a {mode.value} proxy needs a {names}, got {target!r}")
