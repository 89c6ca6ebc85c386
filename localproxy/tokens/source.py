"""Access and client tokens of one proxy process (PROTOCOL.md 2, "single-use").

An access token is single-use unless the first connection presents a client
token; later connections must then present the same one. So a
:class:`TokenSource` always has a client token and sends it on every connection
of the process: the one given (``-i``, env, library), the one in
``--client-token-file`` (created 0600 on first use, reused by the next run), or
one generated at start. With ``rotate_on_reject`` it also recovers from a spent
or mismatched access token by calling ``RotateTunnelAccessToken`` (boto3, the
``localproxy[aws]`` extra) at most ``max_rotations`` times.

Tokens are registered with ``localproxy.ops.logs.register_secret`` and never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from typing import Any

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import (
    AccessTokenUsedError,
    ClientTokenMismatchError,
    ConfigError,
    LocalProxyError,
)
from localproxy.ops.files import MAX_SMALL_FILE_BYTES, UnsuitableFile, read_bounded
from localproxy.types import Mode

__all__ = ["TokenSource", "CLIENT_TOKEN_RE", "generate_client_token", "load_or_create_client_token"]

logger = logging.getLogger("localproxy.tokens")

CLIENT_TOKEN_RE = re.compile(r"^[a-zA-Z0-9-]{32,128}$")


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` in every log line (no-op until the CLI's logs module exists)."""
    if not secret:
        return
    try:
        from localproxy.ops.logs import register_secret as register
    except ImportError:  # pragma: no cover - only while logs.py is not written yet
        return
    register(secret)


def generate_client_token() -> str:
    """A fresh client token: a UUIDv4 string (36 chars, fits ``^[a-zA-Z0-9-]{32,128}$``)."""
    return str(uuid.uuid4())


def load_or_create_client_token(path: str) -> tuple[str, bool]:
    """Read the client token in ``path``, or create the file (mode 0600) with a new one.

    Returns ``(token, created)``. Creation is exclusive (``O_CREAT|O_EXCL``) so two
    processes starting at once end up with the same token.
    """
    for _ in range(2):  # a second round only if another process created it meanwhile
        try:
            return _read_client_token_file(path), False
        except FileNotFoundError:
            pass
        token = generate_client_token()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"Cannot create client token file '{path}': {exc.strerror or exc}") from None
        try:
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return token, True
    raise ConfigError(f"Cannot read or create client token file '{path}'")


def _read_client_token_file(path: str) -> str:
    # In the event loop (LocalProxy's task): a FIFO here would block open() and
    # with it SIGTERM; read_bounded refuses it (and devices, and a big file).
    try:
        data = read_bounded(path, MAX_SMALL_FILE_BYTES)
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except UnsuitableFile as exc:
        raise ConfigError(f"Cannot read client token file '{path}': {exc}") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read client token file '{path}': {exc.strerror or exc}") from None
    token = data.decode("ascii", "replace").strip()
    if not CLIENT_TOKEN_RE.match(token):
        raise ConfigError(
            f"Client token file '{path}' does not hold a valid client token "
            "(32 to 128 characters among a-z A-Z 0-9 and '-'): fix or delete it"
        )
    if mode & 0o077:
        logger.warning("Client token file %s is readable by other users: chmod 600 it", path)
    return token


class TokenSource:
    """The tokens the engine presents on each connection, and rotation on reject.

    ``access_token`` changes only when :meth:`on_rejected` rotated it;
    ``client_token`` is fixed for the life of the process.
    """

    def __init__(self, config: ProxyConfig, client_token: str | None = None) -> None:
        self._config = config
        self._access_token = config.access_token
        self.rotations = 0
        register_secret(self._access_token)
        given = client_token if client_token is not None else config.client_token
        if given is not None:
            if not CLIENT_TOKEN_RE.match(given):
                raise ConfigError("The client token must be 32 to 128 characters among a-z A-Z 0-9 and '-'")
            self._client_token = given
            if config.client_token_file:
                logger.info("Using the given client token; --client-token-file %s is not used", config.client_token_file)
            else:
                logger.info("Using the given client token")
        elif config.client_token_file:
            self._client_token, created = load_or_create_client_token(config.client_token_file)
            if created:
                logger.info("Generated a client token and saved it to %s", config.client_token_file)
            else:
                logger.info("Using the client token from %s", config.client_token_file)
        else:
            self._client_token = generate_client_token()
            logger.info("Using a generated client token for this process (reconnects reuse it)")
        register_secret(self._client_token)
        if config.rotate_on_reject:
            if not config.tunnel_id:
                raise ConfigError("--rotate-on-reject needs --tunnel-id (the tunnel whose token to rotate)")
            _import_boto3()

    @property
    def access_token(self) -> str:
        return self._access_token

    @property
    def client_token(self) -> str:
        return self._client_token

    async def on_rejected(self, error: LocalProxyError) -> bool:
        """After a refused upgrade: rotate the access token if allowed; True = reconnect now.

        Only a spent (:class:`AccessTokenUsedError`) or bound-elsewhere
        (:class:`ClientTokenMismatchError`) token is rotated, only with
        ``config.rotate_on_reject``, at most ``config.max_rotations`` times. On
        False the caller raises ``error`` (its message says how to fix by hand).
        """
        config = self._config
        if not config.rotate_on_reject or not isinstance(error, (AccessTokenUsedError, ClientTokenMismatchError)):
            return False
        if self.rotations >= config.max_rotations:
            logger.error(
                "The service refused the access token again after %d rotation(s) (--max-rotations): giving up",
                self.rotations,
            )
            return False
        # Imported here: only a rotation uses it (start-up, issue 21).
        from localproxy.tokens.advice import client_mode

        mode = client_mode(config.mode)
        logger.warning("The service refused the %s access token; rotating it (%s)", config.mode.value, mode)
        try:
            arn, token = await asyncio.to_thread(self._rotate_blocking)
        except LocalProxyError as exc:
            logger.error("Access token rotation failed: %s", exc)
            return False
        self.rotations += 1
        register_secret(token)
        self._access_token = token
        logger.info("Rotated the %s access token of tunnel %s (rotation %d of at most %d)",
                    config.mode.value, arn, self.rotations, config.max_rotations)
        return True

    def _rotate_blocking(self) -> tuple[str, str]:
        """RotateTunnelAccessToken for this mode; returns (tunnel ARN, new token)."""
        config = self._config
        boto3 = _import_boto3()
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        from localproxy.tokens.advice import client_mode, region_of

        region = region_of(config) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ConfigError("Rotation needs the tunnel's region: give --region (or AWS_REGION)")
        try:
            client = boto3.client(
                "iotsecuretunneling", region_name=region,
                config=Config(connect_timeout=10, read_timeout=20, retries={"max_attempts": 3}),
            )
            request: dict[str, Any] = {"tunnelId": config.tunnel_id, "clientMode": client_mode(config.mode)}
            if config.mode is Mode.DESTINATION:
                # Keep the tunnel's destination config: with a thing name, the service
                # also republishes the new token on the device's notify topic.
                tunnel = client.describe_tunnel(tunnelId=config.tunnel_id)["tunnel"]
                destination_config = tunnel.get("destinationConfig")
                if destination_config and destination_config.get("services"):
                    request["destinationConfig"] = destination_config
            answer = client.rotate_tunnel_access_token(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            message = exc.response.get("Error", {}).get("Message", "")
            raise ConfigError(f"{code}: {message}") from None
        except BotoCoreError as exc:
            raise ConfigError(str(exc)) from None
        key = "sourceAccessToken" if config.mode is Mode.SOURCE else "destinationAccessToken"
        token = answer.get(key)
        if not token:
            raise ConfigError(f"RotateTunnelAccessToken answered without {key}")
        return answer.get("tunnelArn", config.tunnel_id or ""), token


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ConfigError(
            "--rotate-on-reject needs boto3: pip install 'localproxy[aws]'"
        ) from None
    return boto3
