"""User-facing explanations of refused websocket upgrades (PROTOCOL.md 2).

The service answers a refused upgrade with an HTTP status and a short text body.
:func:`rejection_error` turns that into the typed error of ``localproxy.errors``
whose message tells the user what happened, why, and the exact commands that fix
it for this proxy's mode. The texts are built from the config (tunnel id, region,
service names) and never contain an access or client token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    HandshakeRejectedError,
    ServiceUnavailableError,
    TunnelClosedError,
)
from localproxy.types import V1_SERVICE, Mode

# Observed text, tolerant: "can not" (service, 2024) or "cannot" (docs), with or
# without the final period, any case, the "Invalid access token:" prefix optional.
ACCESS_TOKEN_USED_RE = re.compile(
    r"access token was previously used and (?:can\s*not|cannot) be used again\.?", re.IGNORECASE
)
CLIENT_TOKEN_MISMATCH_RE = re.compile(
    r"provided client token does not match the client token that was previously set\.?",
    re.IGNORECASE,
)

# No published text: the emulator says "the tunnel is closed"; match closed/expired tunnels.
TUNNEL_CLOSED_RE = re.compile(r"tunnel (?:is |was |has been )?(?:closed|expired)", re.IGNORECASE)
_DATA_HOST_RE = re.compile(r"^data\.tunneling\.iot\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_MAX_BODY_CHARS = 500
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]+")


def region_of(config: ProxyConfig) -> str | None:
    """The tunnel's region: ``config.region``, the one in the service host name, or the
    AWS CLI's own default (``AWS_REGION`` / ``AWS_DEFAULT_REGION``)."""
    if config.region:
        return config.region
    match = _DATA_HOST_RE.match(config.endpoint.host)
    if match:
        return match.group(1)
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def client_mode(mode: Mode) -> str:
    return "SOURCE" if mode is Mode.SOURCE else "DESTINATION"


def named_services(services: Mapping[str, object] | Iterable[str]) -> list[str]:
    """Service ids of a mapping, without the single unnamed (V1) mapping."""
    return [service for service in services if service != V1_SERVICE]


def rotate_command(
    mode: Mode,
    *,
    tunnel_id: str | None,
    region: str | None,
    thing_name: str | None = None,
    services: Iterable[str] = (),
) -> str:
    """The ``aws`` CLI command that issues a new access token for ``mode``."""
    parts = [
        "aws iotsecuretunneling rotate-tunnel-access-token",
        f"--tunnel-id {tunnel_id or '<tunnel-id>'}",
        f"--client-mode {client_mode(mode)}",
    ]
    if mode is Mode.DESTINATION:
        service_list = ",".join(services) or "<service>"
        parts.append(f"--destination-config thingName={thing_name or '<thing-name>'},services={service_list}")
    parts.append(f"--region {region or '<region>'}")
    return " ".join(parts)


def sanitize_body(body: str, *, secrets: Iterable[str | None] = ()) -> str:
    """Service text made safe to show: no tokens, no control characters, bounded."""
    text = body
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    try:
        from localproxy.ops.logs import (
            redact,  # written by the CLI helper; optional here
        )
    except ImportError:  # pragma: no cover - only while logs.py does not exist yet
        pass
    else:
        text = redact(text)
    text = _CONTROL_CHARS_RE.sub(" ", text).strip()
    if len(text) > _MAX_BODY_CHARS:
        text = text[:_MAX_BODY_CHARS] + "..."
    return text


def rejection_error(
    config: ProxyConfig,
    *,
    status: int,
    reason: str,
    body: str,
    client_token: str | None,
    raw_body: str | None = None,
) -> HandshakeRejectedError:
    """Classify a refused upgrade into its typed error with the full explanation.

    ``body`` must already be sanitized (see :func:`sanitize_body`): it is shown.
    ``raw_body``, the service's text as received, is what is matched, when given.
    """
    matched = body if raw_body is None else raw_body
    seen = f'HTTP {status} {reason}: "{body}"' if body else f"HTTP {status} {reason}"
    if status >= 500:
        message = (
            f"The tunnel service is having trouble ({seen}). This is on the service side: "
            "the proxy retries with backoff (tunneling.proxy.websocket.retry_delay_ms, "
            "connect_retry_count)."
        )
        return ServiceUnavailableError(message, status=status, body=body)
    if ACCESS_TOKEN_USED_RE.search(matched):
        return AccessTokenUsedError(_access_token_used(config, seen), status=status, body=body)
    if CLIENT_TOKEN_MISMATCH_RE.search(matched):
        message = _client_token_mismatch(config, seen, client_token is not None)
        return ClientTokenMismatchError(message, status=status, body=body)
    if TUNNEL_CLOSED_RE.search(matched):
        return TunnelClosedError(_tunnel_closed(config, seen), status=status, body=body)
    return HandshakeRejectedError(_other_rejection(config, seen, status), status=status, body=body)


def _fix_lines(config: ProxyConfig, intro: str = "Fix: issue") -> list[str]:
    mode = config.mode
    token_field = "sourceAccessToken" if mode is Mode.SOURCE else "destinationAccessToken"
    command = rotate_command(
        mode,
        tunnel_id=config.tunnel_id,
        region=region_of(config),
        services=named_services(config.services),
    )
    lines = [
        f"{intro} a new {mode.value} access token (this revokes the old one):",
        f"    {command}",
    ]
    if mode is Mode.DESTINATION:
        lines += [
            "  With thingName set, the service also publishes the new token on",
            "  $aws/things/<thing-name>/tunnels/notify: a device agent subscribed there",
            "  restarts its destination proxy with it by itself.",
        ]
    lines += [
        f"Then restart this proxy with the new {token_field} from that command's output:",
        "    export AWSIOT_TUNNEL_ACCESS_TOKEN=<new token>",
        "    (then run the same localproxy command again, without -t)",
        "To survive reconnects and restarts: keep one client token across runs with",
        "--client-token-file PATH (or -i / AWSIOT_TUNNEL_CLIENT_TOKEN), or let the proxy rotate",
        f"the token by itself with --rotate-on-reject --tunnel-id {config.tunnel_id or '<tunnel-id>'}"
        " (needs AWS credentials).",
    ]
    return lines


def _access_token_used(config: ProxyConfig, seen: str) -> str:
    lines = [
        f"The tunnel service refused the {config.mode.value} access token: it was already used ({seen}).",
        "Why: access tokens are single-use. After a first successful connection, the service "
        "refuses the token for any later connection (a reconnect, a restart), unless that first "
        "connection also presented a client token, which binds the token to that client.",
    ]
    return "\n".join(lines + _fix_lines(config))


def _client_token_mismatch(config: ProxyConfig, seen: str, sent_client_token: bool) -> str:
    sent = "another client token" if sent_client_token else "no client token"
    lines = [
        f"The tunnel service refused the {config.mode.value} access token: it is bound to a "
        f"different client token ({seen}).",
        "Why: the first connection with this access token presented a client token, and the "
        f"service accepts the token again only with that same client token; this proxy sent {sent}. "
        "Without -i or --client-token-file, each run of localproxy generates its own client token, "
        "so a restarted proxy presents a different one.",
    ]
    intro = "Fix: connect with the client token of the first connection, or issue"
    return "\n".join(lines + _fix_lines(config, intro))


def _tunnel_closed(config: ProxyConfig, seen: str) -> str:
    thing = "thingName=<thing>," if config.mode is Mode.DESTINATION else ""
    return "\n".join(
        [
            f"The tunnel is closed ({seen}).",
            "Why: a tunnel lives until CloseTunnel or until its maxLifetimeTimeoutMinutes run out; "
            "then no token of it works again, and rotating tokens does not reopen it.",
            "Fix: open a new tunnel and start both proxies with its tokens:",
            f"    aws iotsecuretunneling open-tunnel --destination-config {thing}services=<svc>"
            f" --region {region_of(config) or '<region>'}",
        ]
    )


def _other_rejection(config: ProxyConfig, seen: str, status: int) -> str:
    region = region_of(config)
    tunnel = config.tunnel_id or "<tunnel-id>"
    token_field = "sourceAccessToken" if config.mode is Mode.SOURCE else "destinationAccessToken"
    lines = [
        f"The tunnel service refused the connection ({seen}).",
        "Likely causes: the access token is wrong, expired, or revoked by a rotation; it is not "
        f"the {token_field} (this proxy runs in {config.mode.value} mode); the region or endpoint "
        "is not the tunnel's; or the tunnel is closed.",
        "Check the tunnel with:",
        f"    python -m localproxy.diagnose --tunnel-id {tunnel} --region {region or '<region>'}",
        "If it is OPEN, get a new token and restart with it:",
        f"    {rotate_command(config.mode, tunnel_id=config.tunnel_id, region=region, services=named_services(config.services))}",
        "    export AWSIOT_TUNNEL_ACCESS_TOKEN=<new token>",
        "If it is CLOSED (closed or expired), open a new tunnel.",
    ]
    if 300 <= status < 400:
        lines.insert(1, "The service answered with a redirect, which this proxy never follows "
                        "(it would send the access token elsewhere): check --proxy-endpoint.")
    return "\n".join(lines)
