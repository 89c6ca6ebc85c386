"""Sans-I/O decisions of ``localproxy connect``: which tunnel to use, what to do next, how to wait.

The I/O side (``control.py``: boto3; ``server.py``: the shared source) feeds it the
control API's answers and carries out what it returns. No sockets, no clock, no boto3 here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NOTIFY_TOPIC = "$aws/things/{thing}/tunnels/notify"


@dataclass(frozen=True)
class TunnelView:
    """What ``connect`` needs of one DescribeTunnel answer."""

    tunnel_id: str
    open: bool
    thing_name: str | None
    services: tuple[str, ...]
    source_connected: bool
    destination_connected: bool
    created_at: float = 0.0

    @classmethod
    def from_description(cls, tunnel: Mapping[str, Any]) -> "TunnelView":
        """From DescribeTunnel's ``tunnel`` member (boto3 gives datetimes, the JSON numbers)."""
        config = tunnel.get("destinationConfig") or {}
        created = tunnel.get("createdAt", 0)
        return cls(
            tunnel_id=str(tunnel["tunnelId"]),
            open=tunnel.get("status") == "OPEN",
            thing_name=config.get("thingName"),
            services=tuple(config.get("services") or ()),
            source_connected=_connected(tunnel.get("sourceConnectionState")),
            destination_connected=_connected(tunnel.get("destinationConnectionState")),
            created_at=created.timestamp() if hasattr(created, "timestamp") else float(created or 0),
        )


def _connected(state: Any) -> bool:
    return isinstance(state, Mapping) and state.get("status") == "CONNECTED"


@dataclass(frozen=True)
class TunnelChoice:
    """``tunnel``: the open tunnel to reuse, or None to open one; ``note`` says why (for stderr)."""

    tunnel: TunnelView | None
    note: str


def choose_tunnel(
    tunnels: Sequence[TunnelView], thing: str, service: str, own_tunnel_id: str | None = None
) -> TunnelChoice:
    """The open tunnel of ``thing`` offering ``service`` that a new source may take over.

    A tunnel whose source is connected belongs to another live proxy: taking it would
    rotate the source token and disconnect that proxy's sessions, so it is passed over
    (a new tunnel costs money, a kicked session costs someone's work). The exception is
    ``own_tunnel_id``, the tunnel of our previous shared source (now gone): the service
    may not have noticed yet that it disconnected.
    """
    offering = [t for t in tunnels if t.open and t.thing_name == thing and service in t.services]
    free = [t for t in offering if not t.source_connected or t.tunnel_id == own_tunnel_id]
    if free:
        best = max(free, key=lambda t: (t.tunnel_id == own_tunnel_id, t.destination_connected, t.created_at))
        return TunnelChoice(best, f"reusing open tunnel {best.tunnel_id} of {thing} (no new tunnel opened)")
    if offering:
        held = ", ".join(t.tunnel_id for t in offering)
        return TunnelChoice(
            None,
            f"the open tunnel(s) {held} of {thing} already have a source proxy connected elsewhere; "
            "opening a new tunnel rather than disconnecting it",
        )
    return TunnelChoice(None, f"no open tunnel of {thing} offers {service}: opening one")


class Next(enum.Enum):
    """What to do about a tunnel before opening a connection through it."""

    READY = "ready"  # the destination is connected: open the connection
    ROTATE_DESTINATION = "rotate-destination"  # publish a fresh destination token to the device
    WAIT = "wait"  # a token was published: poll until the device connects
    CLOSED = "closed"  # the tunnel was closed: start again with another


def next_step(view: TunnelView, token_published: bool) -> Next:
    """``token_published``: OpenTunnel or a destination rotation already notified the device."""
    if not view.open:
        return Next.CLOSED
    if view.destination_connected:
        return Next.READY
    return Next.WAIT if token_published else Next.ROTATE_DESTINATION


def poll_delays(wait: float, first: float = 0.1, factor: float = 1.5, cap: float = 1.0) -> Iterator[float]:
    """Sleeps between DescribeTunnel polls, growing to ``cap``, summing to at most ``wait``.

    Short at first (a device on a good link connects in well under a second), then
    no faster than about one call a second (the control API is rate limited).
    """
    left, delay = max(0.0, wait), first
    while left > 0:
        step = min(delay, left)
        yield step
        left -= step
        delay = min(cap, delay * factor)


def waiting_message(thing: str, tunnel_id: str, wait: float) -> str:
    return (
        f"waiting up to {wait:g} s for {thing} to connect to tunnel {tunnel_id} "
        f"(a fresh destination token was published on {NOTIFY_TOPIC.format(thing=thing)})"
    )


def not_connected_advice(thing: str, tunnel_id: str, wait: float) -> str:
    """The message of DeviceNotConnectedError: what to check on the device."""
    return (
        f"{thing} did not connect to tunnel {tunnel_id} within {wait:g} s. Check that the thing name is "
        f"right, that the device is online and its agent (localproxy-agent or the AWS IoT Device Client) "
        f"is running, and that it is subscribed to {NOTIFY_TOPIC.format(thing=thing)}; "
        "then run the command again (the tunnel stays open for reuse), or wait longer with --wait SECONDS."
    )
