"""Service mapping vs. the tunnel's services (PROTOCOL.md 4.1), sans-I/O.

:func:`resolve_services` turns the configured mapping (``-s``/``-d``/
``--config-dir``) and the SERVICE_IDS the service sent into the mapping the
tunnel serves, keyed by the service id used on the wire, or raises a
:class:`~localproxy.errors.ConfigError` whose message tells the user what to fix.
"""

from __future__ import annotations

import logging
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

__all__ = ["MAX_TUNNEL_SERVICES", "SHOWN_IDS", "ignored_note", "ignored_services", "name_list", "resolve_services"]

MAX_TUNNEL_SERVICES = 3  # a tunnel has at most 3 services (service quota, PROTOCOL.md)
SHOWN_IDS = 5  # ids named in a message; the rest are counted


def _shown(service: str) -> str:
    """A service id as a message shows it: quoted (repr) if it is not plain printable text."""
    return service if service.isprintable() and service.strip() == service and service else repr(service)


def name_list(ids: Sequence[str], limit: int = SHOWN_IDS) -> str:
    """``A, B, C``; past ``limit`` ids ``A, B, C, D, E and 1,995 more`` (a peer can send thousands)."""
    if not ids:
        return "none"
    shown = ", ".join(_shown(service) for service in ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit:,} more"


def ignored_services(served: Mapping[str, ServiceTarget], tunnel_ids: Sequence[str] | None) -> list[str]:
    """Ids the tunnel announced that :func:`resolve_services` left out (source mode)."""
    if tunnel_ids is None:
        return []
    return [service for service in dict.fromkeys(tunnel_ids) if service not in served]


def ignored_note(ignored: Sequence[str], configured: bool) -> tuple[int, str] | None:
    """The log level and line for announced services without a listener (None: there are none)."""
    if not ignored:
        return None
    if configured:
        reason, level = "not configured here (-s)", logging.INFO
    else:
        reason, level = f"beyond the {MAX_TUNNEL_SERVICES} a tunnel may have", logging.WARNING
    return level, (
        f"The tunnel announces {len(ignored):,} service(s) {reason}; no listener for them: {name_list(ignored)}"
    )


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
    Source mode listens only for the configured services (the tunnel may announce
    more: each would be a listening socket the user did not ask for); with no
    mapping, for the tunnel's services up to :data:`MAX_TUNNEL_SERVICES`, on
    ``unmapped`` (a picked free port, ``SourcePort(0)``, or ``InProcess()`` for a
    proxy that must open no port, e.g. ``--stdio``). An ``InProcess()`` ``unmapped``
    also serves the tunnel's other services (up to that many) beside the configured
    ones: they open no socket, and ``open_connection`` can reach them.
    Destination mode needs a target for every tunnel service.
    """
    _check_target_types(mode, configured)
    if tunnel_ids is None:
        return _resolve_v1(mode, configured, unmapped)
    ids = list(dict.fromkeys(tunnel_ids))  # de-duplicated, service order kept
    if V1_SERVICE in configured:
        if len(configured) > 1:
            raise ConfigError("An unnamed mapping cannot be mixed with named services: name them all")
        if len(ids) > 1:
            example = ",".join(f"{_shown(s)}=..." for s in ids[:MAX_TUNNEL_SERVICES])
            flag = "-s" if mode is Mode.SOURCE else "-d"
            raise ConfigError(
                f"The tunnel has several services ({name_list(ids)}): a single unnamed mapping cannot "
                f"choose one. Name each service, e.g. {flag} {example}"
            )
        return {ids[0] if ids else V1_SERVICE: configured[V1_SERVICE]}
    unknown = [service for service in configured if service not in ids]
    if unknown:
        raise ConfigError(
            f"Service id(s) {name_list(unknown)} given to the local proxy are not services of the "
            f"tunnel (the tunnel has: {name_list(ids)}). Use the service ids given to OpenTunnel"
            + ("" if ids else ", or a single unnamed mapping for a tunnel without services")
        )
    if mode is Mode.DESTINATION:
        missing = [service for service in ids if service not in configured]
        if missing:
            raise ConfigError(
                f"No destination is configured for the tunnel's service(s) {name_list(missing)}: "
                f"add e.g. -d {_shown(missing[0])}=host:port (or a line in --config-dir)"
            )
        if not ids:
            raise ConfigError("No destination is configured: give -d port or -d host:port")
    limited = ids[:MAX_TUNNEL_SERVICES]
    if configured:  # source: the configured services, in the tunnel's order
        in_process = isinstance(unmapped, InProcess)  # no socket: the others may be served too
        return {
            service: configured.get(service, unmapped)
            for service in ids
            if service in configured or (in_process and service in limited)
        }
    resolved: dict[str, ServiceTarget] = {service: unmapped for service in limited}
    if not ids:  # a tunnel without services, source mode with no mapping: one picked port
        resolved[V1_SERVICE] = unmapped
    return resolved


def _resolve_v1(
    mode: Mode, configured: Mapping[str, ServiceTarget], unmapped: ServiceTarget
) -> dict[str, ServiceTarget]:
    if len(configured) > 1:
        raise ConfigError(
            f"The V1 protocol carries a single service, but {len(configured)} are configured "
            f"({name_list(list(configured))}): configure one, or use subprotocol V2/V3"
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
