"""Service mappings: ``-s``/``-d`` values and ``--config-dir`` files -> targets.

``-s 5555`` / ``-d 22`` is the single unnamed (V1) mapping; ``SSH1=5555,SSH2=6666``
names services. A destination endpoint is a port (on localhost), ``host:port``,
``[v6addr]:port`` or, when it contains ``/``, a Unix socket path.

Every error names the option or file and the offending item; mappings never
hold secrets, so they may be quoted.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re

from localproxy.errors import ConfigError, UsageError
from localproxy.ops.files import MAX_CONFIG_BYTES, read_user_text
from localproxy.types import (
    V1_SERVICE,
    DestinationTarget,
    Mode,
    ServiceTarget,
    SourcePort,
    SourceUnixSocket,
)

# (logging level, message) pairs, logged by the CLI once logging is set up.
Notes = list[tuple[int, str]]

SERVICE_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")
HOST_PATTERN = re.compile(r"^[a-zA-Z0-9.:\[\]-]+$")
MAX_SERVICE_ID_LENGTH = 128
MAX_HOST_LENGTH = 253
MAX_PATH_LENGTH = 4096
_DIGITS = re.compile(r"^[0-9]+$")
_MAX_CONFIG_FILES = 1000  # a --config-dir pointing at / must not walk the disk
_MAX_LINE_WARNINGS = 10  # per file; a large junk file gets a count, not a line each
# Each file at most MAX_CONFIG_BYTES, all of them together at most this.
MAX_CONFIG_DIR_BYTES = 16 * MAX_CONFIG_BYTES


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """Digits only, 1..65535 (0 too with ``allow_zero``); errors say why."""
    if not text:
        raise UsageError("Port cannot be empty")
    if not _DIGITS.match(text):
        raise UsageError("Port must contain only digits")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise UsageError(f"Port must be between {low} and 65535")
    return port


def validate_service_id(service_id: str) -> None:
    if len(service_id) > MAX_SERVICE_ID_LENGTH:
        raise UsageError("Service ID exceeds maximum allowed length")
    if not SERVICE_ID_PATTERN.match(service_id):
        raise UsageError("Service ID must contain only alphanumeric characters, hyphens, and underscores")


def validate_host(host: str, what: str) -> None:
    """Host names and IP addresses as the reference accepts them (``what``: "Bind address"...)."""
    if not host:
        raise UsageError(f"{what} cannot be empty")
    if len(host) > MAX_HOST_LENGTH:
        raise UsageError(f"{what} exceeds maximum allowed length")
    if not HOST_PATTERN.match(host):
        raise UsageError(f"{what} contains invalid characters")


_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str) -> bool:
    """True for loopback literals (127.0.0.0/8, ::1) and the localhost names."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def validate_path(path: str, what: str = "Path") -> None:
    if not path:
        raise UsageError(f"{what} cannot be empty")
    if len(path) > MAX_PATH_LENGTH:
        raise UsageError(f"{what} exceeds maximum allowed length")
    if "\0" in path:
        raise UsageError(f"{what} contains invalid null byte")


def parse_source_target(text: str) -> SourcePort | SourceUnixSocket:
    """A source listen port (0, beyond the reference, picks a free port), or a Unix
    socket path: any value with ``/``, as ``-d`` takes (beyond the reference)."""
    if "/" in text:
        validate_path(text, "Unix socket path")
        return SourceUnixSocket(text)
    return SourcePort(parse_port(text, allow_zero=True))


def parse_destination_target(text: str) -> DestinationTarget:
    """``22`` -> localhost:22, ``host:22``, ``[::1]:22``, or a path with ``/``."""
    if "/" in text:
        validate_path(text, "Unix socket path")
        return DestinationTarget(unix_path=text)
    if _DIGITS.match(text):
        return DestinationTarget(host="localhost", port=parse_port(text))
    validate_host(text, "Endpoint")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise UsageError("Endpoint must be [address]:port")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise UsageError("An IPv6 endpoint must be written [address]:port")
    else:
        raise UsageError("Endpoint needs a port: port, host:port or [address]:port")
    if not host or "[" in host or "]" in host:
        raise UsageError("Endpoint has an empty or malformed host")
    return DestinationTarget(host=host, port=parse_port(port_text))


def parse_target(text: str, mode: Mode) -> ServiceTarget:
    if mode is Mode.SOURCE:
        return parse_source_target(text)
    return parse_destination_target(text)


def parse_mapping(text: str, mode: Mode, option: str) -> tuple[dict[str, ServiceTarget], Notes]:
    """The value of ``-s``/``-d`` (``option`` names it in errors)."""
    notes: Notes = []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"Must provide at least one port or port mapping for {option}!")
    mappings: dict[str, ServiceTarget] = {}
    for item in items:
        service_id, has_equal, endpoint = item.partition("=")
        # A lone endpoint, or a Unix path that happens to contain '='.
        if not has_equal or "/" in service_id:
            if len(items) != 1:
                raise UsageError(
                    f"Wrong format for the port mappings of {option}! Example: SSH1=5555,SSH2=6666."
                )
            return {V1_SERVICE: _target(item, mode, option, item)}, notes
        service_id, endpoint = service_id.strip(), endpoint.strip()
        if not service_id or not endpoint or ("=" in endpoint and "/" not in endpoint):
            raise UsageError(f"Wrong format for the port mapping '{item}' of {option}. Example: SSH1=5555")
        try:
            validate_service_id(service_id)
        except UsageError as exc:
            raise UsageError(f"Invalid service ID in {option} mapping '{item}': {exc}") from None
        if service_id in mappings:
            notes.append(
                (logging.WARNING, f"Duplicate mappings, ignore. This mapping already exists: {service_id}")
            )
            continue
        mappings[service_id] = _target(endpoint, mode, option, item)
    return mappings, notes


def _target(endpoint: str, mode: Mode, option: str, item: str) -> ServiceTarget:
    try:
        return parse_target(endpoint, mode)
    except UsageError as exc:
        raise UsageError(f"Invalid {option} mapping '{item}': {exc}") from None


def read_config_dir(path: str, mode: Mode, *, strict: bool) -> tuple[dict[str, ServiceTarget], Notes]:
    """Mappings from every regular file under ``path`` (recursively, sorted).

    Lines: ``SERVICE=endpoint``, blank, or comments (``#``/``;``). The first
    mapping found for a service wins, as in the reference. ``strict`` (the
    directory was given with ``--config-dir``) turns every problem into a
    :class:`ConfigError`; otherwise (the default ``./config``) a missing
    directory is ignored and bad lines are skipped with a warning.
    """
    notes: Notes = []
    if not os.path.isdir(path):
        if strict:
            raise ConfigError(f"Invalid configuration directory: {path}")
        notes.append((logging.DEBUG, f"{path} does not exist!"))
        return {}, notes
    files = _config_files(path)
    if strict and not files:
        raise ConfigError(f"Invalid configuration directory: {path} (no configuration files)")
    mappings: dict[str, ServiceTarget] = {}
    total = 0
    for file_path in files:
        notes.append((logging.INFO, f"Detect configuration files: {file_path}"))
        try:
            # A FIFO or a device among the files must not block nor fill memory.
            text = read_user_text(file_path, "configuration file", MAX_CONFIG_BYTES)
        except ConfigError as exc:
            if strict:
                raise
            notes.append((logging.WARNING, f"{exc}. Continue to the next file."))
            continue
        total += len(text)
        if total > MAX_CONFIG_DIR_BYTES:
            reason = f"Configuration directory {path} holds more than {MAX_CONFIG_DIR_BYTES} bytes of files"
            if strict:
                raise ConfigError(reason)
            notes.append((logging.WARNING, reason + ": the rest is not read."))
            break
        lines = text.splitlines()
        ignored = 0
        for number, raw in enumerate(lines, start=1):
            try:
                entry = _config_line(raw, mode)
            except UsageError as exc:
                reason = f"{file_path}:{number}: {exc}"
                if strict:
                    raise ConfigError(reason) from None
                ignored += 1
                if ignored <= _MAX_LINE_WARNINGS:
                    notes.append((logging.WARNING, reason + ". Line ignored."))
                continue
            if entry is None:
                continue
            service_id, target = entry
            if service_id in mappings:
                ignored += 1
                if ignored <= _MAX_LINE_WARNINGS:
                    notes.append(
                        (logging.WARNING, f"{file_path}:{number}: duplicate mapping for {service_id} ignored")
                    )
                continue
            mappings[service_id] = target
        if ignored > _MAX_LINE_WARNINGS:
            notes.append((logging.WARNING, f"{file_path}: {ignored - _MAX_LINE_WARNINGS} more lines ignored"))
    return mappings, notes


def _config_line(raw: str, mode: Mode) -> tuple[str, ServiceTarget] | None:
    line = raw.strip()
    if not line or line[0] in "#;":
        return None
    service_id, has_equal, endpoint = line.partition("=")
    service_id, endpoint = service_id.strip(), endpoint.strip()
    if not has_equal or not service_id or not endpoint:
        raise UsageError("expected SERVICE=endpoint")
    validate_service_id(service_id)
    return service_id, parse_target(endpoint, mode)


def _config_files(path: str) -> list[str]:
    found: list[str] = []
    for directory, subdirectories, names in os.walk(path):
        subdirectories.sort()
        for name in sorted(names):
            file_path = os.path.join(directory, name)
            if os.path.isfile(file_path):
                found.append(file_path)
                if len(found) >= _MAX_CONFIG_FILES:
                    return found
    return found
