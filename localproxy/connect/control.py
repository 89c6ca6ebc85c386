"""The control-plane calls of ``localproxy connect``, through boto3 (blocking: run in a thread).

boto3 is imported when a :class:`Control` is made, so ``localproxy connect --help`` and
the attach path of a later ``connect`` never load it. Every botocore failure becomes a
typed error with a message that says what to do; none carries a token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from localproxy.connect.plan import TunnelView
from localproxy.errors import (
    ConfigError,
    ControlApiError,
    TunnelClosedError,
    UsageError,
)

T = TypeVar("T")
INSTALL_HINT = "pip install 'localproxy[aws]'"
MAX_PAGES = 50  # ListTunnels pages of up to 100 tunnels: more than any account keeps open


class Control:
    """``iotsecuretunneling`` calls for one region (and endpoint URL, e.g. the emulator's)."""

    def __init__(self, region: str | None, endpoint_url: str | None = None) -> None:
        try:
            import boto3
            import botocore.config
        except ImportError:
            raise ConfigError(f"localproxy connect needs boto3 for the control API: {INSTALL_HINT}") from None
        config = botocore.config.Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10, read_timeout=20)
        try:
            self.client: Any = boto3.client(
                "iotsecuretunneling", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except Exception as exc:  # botocore.exceptions.NoRegionError and friends
            raise _translate(exc) from None
        self.region: str = self.client.meta.region_name

    def open_tunnels(self, thing: str) -> list[TunnelView]:
        """The thing's OPEN tunnels, described (ListTunnels gives no services or states)."""
        views: list[TunnelView] = []
        kwargs: dict[str, Any] = {"thingName": thing, "maxResults": 100}
        for _ in range(MAX_PAGES):
            page = self._call(self.client.list_tunnels, **kwargs)
            for summary in page.get("tunnelSummaries", []):
                if summary.get("status") == "OPEN":
                    view = self.describe(summary["tunnelId"])
                    if view.open:
                        views.append(view)
            if not page.get("nextToken"):
                break
            kwargs["nextToken"] = page["nextToken"]
        return views

    def describe(self, tunnel_id: str) -> TunnelView:
        return TunnelView.from_description(self._call(self.client.describe_tunnel, tunnelId=tunnel_id)["tunnel"])

    def open_tunnel(self, thing: str, services: list[str], minutes: int) -> tuple[str, str]:
        """Open a tunnel to ``thing`` (the service notifies the device); -> (tunnel id, source token)."""
        answer = self._call(
            self.client.open_tunnel,
            description=f"localproxy connect {thing}",
            destinationConfig={"thingName": thing, "services": services},
            timeoutConfig={"maxLifetimeTimeoutMinutes": minutes},
        )
        return str(answer["tunnelId"]), str(answer["sourceAccessToken"])

    def rotate_source(self, tunnel_id: str) -> str:
        answer = self._call(self.client.rotate_tunnel_access_token, tunnelId=tunnel_id, clientMode="SOURCE")
        return str(answer["sourceAccessToken"])

    def rotate_destination(self, tunnel_id: str, thing: str, services: list[str]) -> None:
        """New destination token, published on the thing's notify topic (needs destinationConfig)."""
        self._call(
            self.client.rotate_tunnel_access_token,
            tunnelId=tunnel_id,
            clientMode="DESTINATION",
            destinationConfig={"thingName": thing, "services": services},
        )

    def close(self, tunnel_id: str) -> None:
        self._call(self.client.close_tunnel, tunnelId=tunnel_id)

    def _call(self, method: Callable[..., T], **kwargs: Any) -> T:
        try:
            return method(**kwargs)
        except Exception as exc:
            raise _translate(exc, kwargs.get("tunnelId")) from None


def _translate(exc: Exception, tunnel_id: str | None = None) -> Exception:
    """A botocore exception -> a typed localproxy error (never a traceback for the user)."""
    name = type(exc).__name__
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    message = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return ControlApiError(
            "no AWS credentials for the control API: configure them (aws configure, AWS_PROFILE, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an instance role)"
        )
    if name == "NoRegionError":
        return UsageError("no AWS region: pass -r REGION (or set AWS_DEFAULT_REGION)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        return ControlApiError(f"cannot reach the Secure Tunneling control API: {message}")
    if code == "ValidationException":
        return UsageError(f"the control API refused the request: {message}")
    if code == "ResourceNotFoundException":
        return TunnelClosedError(f"tunnel {tunnel_id or '?'} no longer exists: {message}")
    if code == "InvalidRequestException" and "closed" in message.lower():
        return TunnelClosedError(f"tunnel {tunnel_id or '?'} is closed")
    if code in ("AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
                "ExpiredTokenException", "InvalidClientTokenId"):  # fmt: skip
        return ControlApiError(f"the control API denied access ({code}): check your AWS credentials and IAM policy")
    if code == "LimitExceededException":
        return ControlApiError(f"the account's tunnel limit is reached: {message}")
    if code or name.endswith("Error"):
        return ControlApiError(f"control API call failed: {message}")
    return exc  # not from botocore: a bug, let it show
