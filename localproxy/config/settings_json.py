"""The JSON form of the settings (``--settings-json``, ``--export-default-settings``).

``--export-default-settings`` writes :data:`DEFAULT_SETTINGS_TREE` exactly in
the reference's shape (a nested JSON tree, values as strings).
"""

from __future__ import annotations

import re
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Mapping

from localproxy.errors import ConfigError, UsageError
from localproxy.ops.files import MAX_CONFIG_BYTES, read_user_text
from localproxy.settings import (
    EXTRA_SETTING_KEYS,
    REGION_OVERRIDES_PREFIX,
    SETTING_KEYS,
    SUBPROTOCOLS,
    Settings,
)

_INT_MINIMUMS: Mapping[str, int] = MappingProxyType(
    {
        "data_length_size": 2,
        "data_frame_max_size": 1,
        "max_payload_size": 1,
        "max_size": 1,
        "tcp_connection_retry_count": -1,  # -1: retry forever
        "tcp_connection_retry_delay_ms": 0,
        "tcp_read_buffer_size": 1,
        "tcp_max_active_connections": 1,
        "ping_period_ms": 1,
        "retry_delay_ms": 0,
        "connect_retry_count": -1,  # -1: retry forever
        "max_frame_size": 1,
        "ws_write_buffer_size": 1,
        "ws_read_buffer_size": 1,
        "receive_budget_bytes": 65536,
        "stalled_reader_timeout_ms": 0,  # 0: never reset a stalled reader
        "ws_socket_receive_buffer": 0,  # 0: the kernel's autotuning
    }
)
_INT_MAXIMUMS: Mapping[str, int] = MappingProxyType(
    {"data_length_size": 2, "max_payload_size": 64512}  # protocol limits (PROTOCOL.md 3)
)
_MIN_SOCKET_BUFFER = 65536
_BOOL_ATTRIBUTES = frozenset({"reconnect_on_data_error"})
# The reference's tree is 4 levels deep; past this a file is not settings (and
# json would recurse once per level).
MAX_SETTINGS_DEPTH = 32
# Integers as text: 18 digits fit every setting; int() of thousands of digits is
# slow and, past 4,300, a ValueError.
MAX_UNKNOWN_WARNINGS = 20  # one line each; a file of 50,000 junk keys gets a count
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,18}")
_SHOWN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_HOST_PATTERN = re.compile(r"^[a-zA-Z0-9.:\[\]-]+$")
_REGION_PATTERN = re.compile(r"^[a-z0-9-]+$")


def settings_to_tree(settings: Settings) -> dict[str, Any]:
    """The nested JSON tree of ``settings`` in the reference's shape and key order.

    Values are strings, as boost's property tree writes them.
    """
    proxy: dict[str, Any] = {}
    for key, attribute in SETTING_KEYS.items():
        parts = key.split(".")[2:]  # drop "tunneling.proxy"
        node = proxy
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _to_text(getattr(settings, attribute))
    proxy["region_endpoint_overrides"] = dict(settings.region_endpoint_overrides)
    return {"tunneling": {"proxy": proxy}}


def export_settings(path: str, settings: Settings | None = None) -> None:
    """Write ``settings`` (default: the built-in defaults) to ``path`` as the reference does.

    Raises :class:`ConfigError` when the file cannot be written.
    """
    import json  # here: a run without settings files does not load json (start-up, issue 21)

    tree = settings_to_tree(settings if settings is not None else Settings())
    text = json.dumps(tree, indent=4) + "\n"
    try:
        with open(path, "w", encoding="utf-8") as output:
            output.write(text)
    except OSError as exc:
        raise ConfigError(f"Cannot write settings to {path}: {exc.strerror or exc}") from exc


def load_settings_json(path: str, base: Settings | None = None) -> tuple[Settings, list[str]]:
    """Read a ``--settings-json`` file over ``base`` (default: built-in defaults).

    Returns the new settings and warnings (unknown keys are ignored with a
    warning, as the reference ignores them). An unreadable or malformed file
    raises :class:`ConfigError`; a bad value raises :class:`UsageError` naming the key.
    """
    text = read_user_text(path, "settings file", MAX_CONFIG_BYTES)  # a FIFO, /dev/zero: ConfigError
    # here: a run without settings files does not load json (start-up, issue 21)
    import json

    from localproxy.ops.json_limits import JsonRefused, loads_bounded

    try:
        tree = loads_bounded(text, MAX_SETTINGS_DEPTH)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"Cannot parse settings file {path}: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except JsonRefused as exc:
        raise ConfigError(f"Cannot parse settings file {path}: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"Settings file {path} must hold a JSON object")
    return settings_from_tree(tree, base, source=path)


def settings_from_tree(
    tree: Mapping[str, Any], base: Settings | None = None, *, source: str = "settings"
) -> tuple[Settings, list[str]]:
    """Apply a nested (or dotted-key) settings tree over ``base``; see :func:`load_settings_json`."""
    values: dict[str, Any] = {}
    overrides = dict((base or Settings()).region_endpoint_overrides)
    warnings: list[str] = []
    unknown = 0
    for key, raw in _flatten(tree):
        attribute = SETTING_KEYS.get(key) or EXTRA_SETTING_KEYS.get(key)
        if attribute is not None:
            values[attribute] = _parse_value(attribute, raw, key, source)
        elif key.startswith(REGION_OVERRIDES_PREFIX):
            region = key[len(REGION_OVERRIDES_PREFIX):]
            host = raw if isinstance(raw, str) else None
            if not _REGION_PATTERN.match(region) or not host or not _HOST_PATTERN.match(host):
                raise UsageError(
                    f"Invalid value for setting {_shown(key)} in {source}: expected a host name"
                    " for a region of lower-case letters, digits and hyphens"
                )
            overrides[region] = host
        else:
            unknown += 1
            if unknown <= MAX_UNKNOWN_WARNINGS:
                warnings.append(f"Ignoring unknown setting {_shown(key)} in {source}")
    if unknown > MAX_UNKNOWN_WARNINGS:
        warnings.append(f"Ignoring {unknown - MAX_UNKNOWN_WARNINGS} more unknown settings in {source}")
    values["region_endpoint_overrides"] = MappingProxyType(overrides)
    return replace(base or Settings(), **values), warnings


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            items.extend(_flatten(value, key + "."))
        else:
            items.append((key, value))
    return items


def _parse_value(attribute: str, raw: Any, key: str, source: str) -> Any:
    def bad(reason: str) -> UsageError:
        return UsageError(f"Invalid value for setting {_shown(key)} in {source}: {reason}")

    if attribute in _BOOL_ATTRIBUTES:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise bad("expected true or false")
    if attribute == "subprotocol":
        if raw not in SUBPROTOCOLS:
            raise bad("expected one of " + ", ".join(SUBPROTOCOLS))
        return raw
    if attribute == "default_bind_address":
        if not isinstance(raw, str) or not _HOST_PATTERN.match(raw):
            raise bad("expected a host name or IP address")
        return raw
    # Integer settings: JSON numbers or strings of digits (boost writes strings).
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise bad("expected an integer")
    if isinstance(raw, int) and not -10**18 < raw < 10**18:
        raise bad("expected an integer of at most 18 digits")
    text = str(raw).strip()
    if not _INTEGER_TEXT.fullmatch(text):
        raise bad("expected an integer" + (" of at most 18 digits" if re.fullmatch(r"-?[0-9]+", text) else ""))
    number = int(text)
    minimum = _INT_MINIMUMS.get(attribute, 0)
    maximum = _INT_MAXIMUMS.get(attribute)
    if number < minimum or (maximum is not None and number > maximum):
        limit = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise bad(f"must be {limit}")
    if attribute == "ws_socket_receive_buffer" and 0 < number < _MIN_SOCKET_BUFFER:
        # A window of a few segments stalls TCP (loopback's segments are 64 KiB).
        raise bad(f"must be 0 (the kernel's autotuning) or at least {_MIN_SOCKET_BUFFER}")
    return number


def _shown(key: str) -> str:
    """A key quoted in a message only if it looks like one: a file's keys are not
    ours to print (a pasted token, control characters, a 1 MiB line)."""
    if _SHOWN_KEY.fullmatch(key):
        return f"'{key}'"
    return f"(a key of {len(key)} characters, not shown: only letters, digits, '_', '.', '-' are)"


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


DEFAULT_SETTINGS_TREE: Mapping[str, Any] = MappingProxyType(settings_to_tree(Settings()))
