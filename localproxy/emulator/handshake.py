"""Data-plane admission: may this ``GET /tunnel`` upgrade become a session? (sans-I/O)

Checks run in this order, request format first, then authorization:
path, ``local-proxy-mode``, access token count, client token, subprotocol, then the
token itself (known, not revoked, tunnel open, right mode, single-use / bound client
token). Every refusal is HTTP 400, the only status observed from the real service
for a refused token; bodies are the real ones where known (PROTOCOL.md 2) and never
contain a token. ``commit`` records a successful handshake (spends or binds the token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from localproxy.emulator.store import AccessToken, Side, Store

SUBPROTOCOL_VERSIONS: dict[str, int] = {
    "aws.iot.securetunneling-3.0": 3,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-1.0": 1,
}
CLIENT_TOKEN_RE = re.compile(r"[a-zA-Z0-9-]{32,128}")
TOKEN_COOKIE = "awsiot-tunnel-token"
MAX_REQUEST_HEAD = 4096  # the whole upgrade request must stay under 4 KiB

ACCESS_TOKEN_USED = (
    "Invalid access token: The access token was previously used and can not be used again."
)
CLIENT_TOKEN_MISMATCH = (
    "Invalid client token: The provided client token does not match the client token "
    "that was previously set."
)


class HeaderLookup(Protocol):
    def get_all(self, key: str) -> list[str]: ...


@dataclass(frozen=True)
class Rejection:
    status: int
    body: str


@dataclass(frozen=True)
class Admission:
    tunnel_id: str
    side: Side
    token: AccessToken = field(repr=False)
    client_token: str | None = field(repr=False)
    subprotocol: str

    @property
    def version(self) -> int:
        return SUBPROTOCOL_VERSIONS[self.subprotocol]


def offered_subprotocols(headers: HeaderLookup) -> list[str]:
    offered: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        offered += [item.strip() for item in value.split(",") if item.strip()]
    return offered


_Name = TypeVar("_Name", bound=str)  # str, or websockets' Subprotocol NewType


def choose_subprotocol(offered: list[_Name]) -> _Name | None:
    """The highest version the client offers, or None."""
    known = [name for name in offered if name in SUBPROTOCOL_VERSIONS]
    return max(known, key=SUBPROTOCOL_VERSIONS.__getitem__) if known else None


def _cookie_tokens(headers: HeaderLookup) -> list[str]:
    found: list[str] = []
    for header in headers.get_all("Cookie"):
        for pair in header.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name.strip() == TOKEN_COOKIE:
                found.append(value.strip().strip('"'))
    return found


def evaluate(store: Store, path: str, headers: HeaderLookup) -> Admission | Rejection:
    url = urlsplit(path)
    if url.path != "/tunnel":
        return Rejection(400, f"Invalid request path {url.path!r}: the data plane only serves GET /tunnel")
    modes = parse_qs(url.query, keep_blank_values=True).get("local-proxy-mode", [])
    if not modes:
        return Rejection(400, "Missing query parameter local-proxy-mode: use local-proxy-mode=source or destination")
    if len(modes) > 1:
        return Rejection(400, "Invalid query parameter: local-proxy-mode must be given exactly once")
    if modes[0] not in ("source", "destination"):
        return Rejection(400, f"Invalid local-proxy-mode {modes[0][:40]!r}: use source or destination")
    side: Side = "source" if modes[0] == "source" else "destination"

    tokens = headers.get_all("access-token") + _cookie_tokens(headers)
    if not tokens:
        return Rejection(
            400, f"Missing access token: send it in the access-token header (or the {TOKEN_COOKIE} cookie)"
        )
    if len(tokens) > 1:
        return Rejection(400, f"Invalid access token: exactly one access token is allowed, got {len(tokens)}")
    client_tokens = headers.get_all("client-token")
    if len(client_tokens) > 1:
        return Rejection(400, f"Invalid client token: at most one client-token header is allowed, got {len(client_tokens)}")
    client_token = client_tokens[0] if client_tokens else None
    if client_token is not None and not CLIENT_TOKEN_RE.fullmatch(client_token):
        return Rejection(400, "Invalid client token: it must be 32 to 128 characters of a-z, A-Z, 0-9 and '-'")

    offered = offered_subprotocols(headers)
    subprotocol = choose_subprotocol(offered)
    if subprotocol is None:
        wanted = ", ".join(SUBPROTOCOL_VERSIONS)
        got = ", ".join(offered)[:200] if offered else "none"
        return Rejection(400, f"Unsupported subprotocol: offer one of {wanted} in Sec-WebSocket-Protocol (offered: {got})")

    token = store.find_token(tokens[0])
    tunnel = store.tunnel_of(token) if token is not None else None
    if token is None or tunnel is None:
        return Rejection(400, "Invalid access token: the token is not known to the service (mistyped, or of a deleted tunnel)")
    if tunnel.status != "OPEN":
        return Rejection(400, f"Invalid access token: the tunnel is closed ({tunnel.closed_reason})")
    if token.revoked:
        return Rejection(400, "Invalid access token: the token was revoked by RotateTunnelAccessToken; use the new one")
    if token.side != side:
        return Rejection(
            400, f"Invalid access token: this is a {token.side} access token but local-proxy-mode is {side}"
        )
    if token.client_token is not None:
        if client_token != token.client_token:
            return Rejection(400, CLIENT_TOKEN_MISMATCH)
    elif token.spent:
        return Rejection(400, ACCESS_TOKEN_USED)
    return Admission(tunnel.tunnel_id, side, token, client_token, subprotocol)


def commit(admission: Admission) -> None:
    """Record a successful handshake: bind the client token, or spend a single-use token."""
    token = admission.token
    if admission.client_token is not None:
        token.client_token = admission.client_token
    else:
        token.spent = True
