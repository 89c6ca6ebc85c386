"""Typed errors of localproxy, each with the process exit code the CLI uses.

Messages never contain an access or client token: callers pass redacted text.
The exit codes are documented in docs/command-line.md ("Exit codes").
"""

from __future__ import annotations


class ExitCode:
    """Process exit statuses of ``python -m localproxy`` (see docs/command-line.md)."""

    OK = 0
    USAGE = 1  # bad flag or value; same as the reference binary
    CONFIG = 2  # service mapping does not fit the tunnel (SERVICE_IDS), bad config file
    ACCESS_TOKEN_USED = 3  # single-use access token was already spent
    CLIENT_TOKEN_MISMATCH = 4  # token bound to another client token
    HANDSHAKE_REJECTED = 5  # any other 4xx: invalid/expired/revoked token, wrong mode
    TUNNEL_CLOSED = 6  # the tunnel was closed or expired while connected
    CONNECTION_FAILED = 7  # gave up: retries exhausted (5xx, network, TLS)
    PROTOCOL = 8  # the service sent something that breaks the protocol
    DEVICE_NOT_CONNECTED = 9  # connect: the device did not connect within --wait
    CONTROL_API = 10  # connect: the control API failed (no credentials, access denied, unreachable)
    INTERNAL = 70  # a bug: please report it


class LocalProxyError(Exception):
    """Base class of every error localproxy raises on purpose."""

    exit_code: int = ExitCode.INTERNAL


class UsageError(LocalProxyError):
    """Invalid command line, environment or settings value."""

    exit_code = ExitCode.USAGE


class ConfigError(LocalProxyError):
    """The configuration cannot work (mapping vs. tunnel services, unreadable files)."""

    exit_code = ExitCode.CONFIG


class UnknownServiceError(ConfigError):
    """A local connection was asked for a service the tunnel does not serve."""


class TunnelNotReadyError(LocalProxyError):
    """No tunnel session to carry a new local connection: not connected yet,
    reconnecting, or the proxy is closed (``LocalProxy.open_connection``)."""

    exit_code = ExitCode.CONNECTION_FAILED


class ProtocolError(LocalProxyError):
    """Bytes or messages that break the Secure Tunneling wire protocol."""

    exit_code = ExitCode.PROTOCOL


class ConnectionFailedError(LocalProxyError):
    """The websocket to the service could not be (re)established in the allowed tries."""

    exit_code = ExitCode.CONNECTION_FAILED


class HandshakeRejectedError(LocalProxyError):
    """The service refused the websocket upgrade.

    ``status`` is the HTTP status, ``body`` the service's text (never holds a token).
    A 4xx is never retried with the same request; a 5xx is (``retryable``).
    """

    exit_code = ExitCode.HANDSHAKE_REJECTED

    def __init__(self, message: str, *, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status >= 500


class AccessTokenUsedError(HandshakeRejectedError):
    """The access token was already used without a client token (single-use)."""

    exit_code = ExitCode.ACCESS_TOKEN_USED


class ClientTokenMismatchError(HandshakeRejectedError):
    """The access token is bound to a different client token."""

    exit_code = ExitCode.CLIENT_TOKEN_MISMATCH


class TunnelClosedError(HandshakeRejectedError):
    """The tunnel is closed (CloseTunnel or lifetime expiry): nothing can reconnect to it."""

    exit_code = ExitCode.TUNNEL_CLOSED


class ServiceUnavailableError(HandshakeRejectedError):
    """A 5xx answer to the upgrade: the service is in trouble, retry with backoff."""

    exit_code = ExitCode.CONNECTION_FAILED


class MissingExtraError(LocalProxyError):
    """A feature needs a package of an extra that is not installed; the message names the extra."""

    exit_code = ExitCode.USAGE


class DeviceNotConnectedError(LocalProxyError):
    """``localproxy connect``: the thing's destination did not connect within the wait.

    Secure Tunneling does not know which things exist, so an unknown thing name ends here too.
    """

    exit_code = ExitCode.DEVICE_NOT_CONNECTED


class ControlApiError(LocalProxyError):
    """``localproxy connect``: a control-plane call failed (credentials, permissions, network)."""

    exit_code = ExitCode.CONTROL_API
