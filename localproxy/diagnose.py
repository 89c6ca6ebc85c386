"""``python -m localproxy.diagnose --tunnel-id ID``: what state is my tunnel in, and the fix.

Calls ``DescribeTunnel`` (boto3, the ``localproxy[aws]`` extra) and prints the
tunnel status, each side's connection state with its age, the lifetime left, and
the commands that fix what it sees (the three cases of the token-rotation
troubleshooting page). Honours ``--endpoint-url``, ``AWS_ENDPOINT_URL`` and
``AWS_ENDPOINT_URL_IOTSECURETUNNELING`` (e.g. the local emulator).

Exit status: 0 when the tunnel could be described (whatever its state), 1 when
not (tunnel not found, no credentials, no region, endpoint unreachable, boto3
missing), 2 for bad arguments. Errors are one clear line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from localproxy.tokens.advice import rotate_command
from localproxy.types import Mode

__all__ = ["main", "describe", "report"]


class DiagnoseError(Exception):
    """A failure to describe the tunnel, with the message for the user."""


def describe(tunnel_id: str, *, region: str | None, endpoint_url: str | None) -> tuple[dict[str, Any], str]:
    """DescribeTunnel's ``tunnel`` and the region used; :class:`DiagnoseError` on failure."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
        )
    except ImportError:
        raise DiagnoseError("diagnose needs boto3: pip install 'localproxy[aws]'") from None
    try:
        client = boto3.client(
            "iotsecuretunneling", region_name=region, endpoint_url=endpoint_url,
            config=Config(connect_timeout=10, read_timeout=20, retries={"max_attempts": 3}),
        )
        return dict(client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]), client.meta.region_name
    except NoRegionError:
        raise DiagnoseError("No region: give --region (or set AWS_REGION)") from None
    except NoCredentialsError:
        raise DiagnoseError(
            "No AWS credentials found: configure them (aws configure, AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or a profile with AWS_PROFILE)"
        ) from None
    except EndpointConnectionError as exc:
        raise DiagnoseError(f"Cannot reach the Secure Tunneling API: {exc}") from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Error"), error.get("Message", "")
        if code == "ResourceNotFoundException":
            raise DiagnoseError(
                f"Tunnel {tunnel_id} not found ({message or code}): check the tunnel id and the region"
            ) from None
        raise DiagnoseError(f"DescribeTunnel failed: {code}: {message}") from None
    except BotoCoreError as exc:
        raise DiagnoseError(f"DescribeTunnel failed: {exc}") from None


def _as_datetime(value: Any) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    return None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _state(tunnel: Mapping[str, Any], key: str, now: datetime.datetime) -> tuple[str, str]:
    state = tunnel.get(key) or {}
    status = str(state.get("status", "UNKNOWN"))
    since = _as_datetime(state.get("lastUpdatedAt"))
    age = f" for {_duration((now - since).total_seconds())}" if since else ""
    return status, age


def report(tunnel: Mapping[str, Any], *, region: str | None, now: datetime.datetime | None = None) -> str:
    """The human report for one DescribeTunnel ``tunnel`` (pure function)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    tunnel_id = str(tunnel.get("tunnelId", "<tunnel-id>"))
    status = str(tunnel.get("status", "UNKNOWN"))
    source, source_age = _state(tunnel, "sourceConnectionState", now)
    destination, destination_age = _state(tunnel, "destinationConnectionState", now)
    destination_config = tunnel.get("destinationConfig") or {}
    thing = destination_config.get("thingName")
    services = list(destination_config.get("services") or [])
    lines = [f"Tunnel {tunnel_id} ({tunnel.get('tunnelArn', '')})", f"  status:      {status}"]
    if thing or services:
        lines.append(f"  destination: thing {thing or '(none)'}, services {', '.join(services) or '(none)'}")
    lines += [f"  source:      {source}{source_age}", f"  destination: {destination}{destination_age}"]
    created = _as_datetime(tunnel.get("createdAt"))
    lifetime = (tunnel.get("timeoutConfig") or {}).get("maxLifetimeTimeoutMinutes", 720)
    if created is not None:
        left = created + datetime.timedelta(minutes=int(lifetime)) - now
        lines.append(f"  time left:   {_duration(left.total_seconds())} of {lifetime} min"
                     + (" (expired)" if left.total_seconds() <= 0 else ""))
    lines.append("")
    lines += _advice(tunnel_id, region, status, source, destination, thing, services)
    return "\n".join(lines) + "\n"


def _advice(
    tunnel_id: str, region: str | None, status: str, source: str, destination: str,
    thing: str | None, services: Sequence[str],
) -> list[str]:
    if status == "CLOSED":
        return [
            "The tunnel is CLOSED (closed or past its lifetime): tokens cannot revive it.",
            "Open a new tunnel:",
            f"    aws iotsecuretunneling open-tunnel --region {region or '<region>'} "
            f"--destination-config thingName={thing or '<thing-name>'},services={','.join(services) or '<service>'}",
        ]
    if source == "CONNECTED" and destination == "CONNECTED":
        return ["Both sides are CONNECTED: the tunnel is healthy."]
    lines: list[str] = []
    if destination == "DISCONNECTED":
        lines += [
            "The destination (device) is not connected. Issue a new destination token:",
            "    " + rotate_command(Mode.DESTINATION, tunnel_id=tunnel_id, region=region,
                                    thing_name=thing, services=services),
        ]
        if thing:
            lines += [
                f"The service revokes the old token and publishes the new one on "
                f"$aws/things/{thing}/tunnels/notify.",
                "The device agent must be subscribed to that topic and restart its destination",
                "proxy with the new token (localproxy -m destination with AWSIOT_TUNNEL_ACCESS_TOKEN).",
            ]
        else:
            lines.append("The tunnel has no thing name: start the destination proxy by hand with the new "
                         "destinationAccessToken.")
    if source == "DISCONNECTED":
        lines += [
            "The source is not connected. If your source proxy fails with 'previously used' or a client",
            "token mismatch, issue a new source token and restart the source proxy with it:",
            "    " + rotate_command(Mode.SOURCE, tunnel_id=tunnel_id, region=region),
            "    export AWSIOT_TUNNEL_ACCESS_TOKEN=<new sourceAccessToken>",
            "(--client-mode ALL rotates both sides at once.)",
        ]
    return lines or ["Unknown connection states: check the AWS console."]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m localproxy.diagnose",
        description="Describe a Secure Tunneling tunnel and print how to fix its connection problems.",
    )
    parser.add_argument("--tunnel-id", required=True)
    parser.add_argument("--region", default=None, help="default: AWS_REGION / AWS_DEFAULT_REGION / profile")
    parser.add_argument("--endpoint-url", default=None, help="control-plane URL (e.g. the local emulator)")
    args = parser.parse_args(argv)
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        tunnel, region = describe(args.tunnel_id, region=region, endpoint_url=args.endpoint_url)
    except DiagnoseError as exc:
        print(f"localproxy.diagnose: {exc}", file=err)
        return 1
    out.write(report(tunnel, region=region))
    return 0


if __name__ == "__main__":
    sys.exit(main())
