"""Tunnel notifications: the MQTT message the service sends to a device (sans-I/O).

When a tunnel is opened with ``destinationConfig.thingName`` (or its destination
token rotated with a ``destinationConfig``), the service publishes on
``$aws/things/<thing>/tunnels/notify``::

    {"clientAccessToken": "...", "clientMode": "destination",
     "region": "us-east-1", "services": ["SSH"]}

:func:`parse_notification` turns those bytes into a :class:`Notification` or
raises :class:`InvalidNotification` whose message says why. Rejection reasons
never quote the token nor raw payload text: only values that passed a strict
pattern (service ids, a known client mode) are named.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from localproxy.errors import LocalProxyError, UsageError
from localproxy.ops.json_limits import JsonRefused, loads_bounded

__all__ = [
    "MAX_NOTIFICATION_BYTES",
    "MAX_NOTIFICATION_DEPTH",
    "MAX_SERVICES",
    "NOTIFY_TOPIC_TEMPLATE",
    "InvalidNotification",
    "Notification",
    "notify_topic",
    "parse_notification",
]

NOTIFY_TOPIC_TEMPLATE = "$aws/things/{thing}/tunnels/notify"
MAX_SERVICES = 3  # service quota per tunnel (PROTOCOL.md 6)
MAX_ACCESS_TOKEN_LENGTH = 4096  # the proxy's own limit on -t
# A real notification is well under 8 KiB; anything far bigger is not one.
MAX_NOTIFICATION_BYTES = 64 * 1024
# A notification is one flat object; json.loads would recurse once per level.
MAX_NOTIFICATION_DEPTH = 8

REGION_PATTERN = re.compile(r"^[a-z0-9-]+$")
SERVICE_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")  # as -d/-s mappings (localproxy.config.mappings)
THING_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_MAX_SERVICE_ID_LENGTH = 128
_MAX_REGION_LENGTH = 64
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class InvalidNotification(LocalProxyError):
    """A notify message the agent will not act on; the message says why (no secrets)."""


@dataclass(frozen=True)
class Notification:
    """A valid destination notification. The token is kept out of ``repr``."""

    access_token: str = field(repr=False)
    region: str
    services: tuple[str, ...]

    @property
    def token_digest(self) -> str:
        """SHA-256 of the token: remembers "seen" tokens without keeping the secrets."""
        return hashlib.sha256(self.access_token.encode("utf-8")).hexdigest()


def notify_topic(thing_name: str, template: str = NOTIFY_TOPIC_TEMPLATE) -> str:
    """The topic the service publishes a thing's notifications on."""
    if not THING_NAME_PATTERN.match(thing_name):
        raise UsageError("Invalid thing name: 1 to 128 characters among a-z A-Z 0-9 ':' '_' '-'")
    return template.format(thing=thing_name)


def parse_notification(payload: bytes | bytearray | memoryview | str) -> Notification:
    """Validate a notify payload; raise :class:`InvalidNotification` (reason) if unusable.

    Unknown extra members are ignored (the service may add some later).
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if len(payload) > MAX_NOTIFICATION_BYTES:
        raise InvalidNotification(f"payload of {len(payload)} bytes is too large for a notification")
    try:
        document = loads_bounded(bytes(payload), MAX_NOTIFICATION_DEPTH)
    except JsonRefused as error:
        raise InvalidNotification(f"payload refused: {error}") from None
    except (UnicodeDecodeError, ValueError):
        raise InvalidNotification("payload is not UTF-8 JSON") from None
    if not isinstance(document, dict):
        raise InvalidNotification(f"payload is a JSON {_json_kind(document)}, not an object")

    mode = document.get("clientMode")
    if mode != "destination":
        if mode in ("source", "SOURCE", "DESTINATION"):
            raise InvalidNotification(f"clientMode is {mode!r}, expected 'destination'")
        raise InvalidNotification("clientMode is missing or not 'destination'")

    token = document.get("clientAccessToken")
    if not isinstance(token, str) or not token:
        raise InvalidNotification("clientAccessToken is missing or not a non-empty string")
    if len(token) > MAX_ACCESS_TOKEN_LENGTH:
        raise InvalidNotification(f"clientAccessToken is longer than {MAX_ACCESS_TOKEN_LENGTH} characters")
    if _CONTROL_CHARACTERS.search(token):
        raise InvalidNotification("clientAccessToken contains control characters")

    region = document.get("region")
    if not isinstance(region, str) or len(region) > _MAX_REGION_LENGTH or not REGION_PATTERN.match(region):
        raise InvalidNotification("region is missing or does not match ^[a-z0-9-]+$")

    return Notification(access_token=token, region=region, services=_services(document.get("services")))


def _services(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidNotification("services is missing or not a list")
    if not 1 <= len(value) <= MAX_SERVICES:
        raise InvalidNotification(f"services lists {len(value)} service ids, expected 1 to {MAX_SERVICES}")
    services: list[str] = []
    for item in value:
        if (
            not isinstance(item, str)
            or len(item) > _MAX_SERVICE_ID_LENGTH
            or not SERVICE_ID_PATTERN.match(item)
        ):
            raise InvalidNotification("services holds an item that is not a service id ([a-zA-Z0-9_-]+)")
        if item in services:
            raise InvalidNotification(f"services lists {item} twice")
        services.append(item)
    return tuple(services)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
