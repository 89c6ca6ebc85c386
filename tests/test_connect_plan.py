"""localproxy connect's sans-I/O parts: which tunnel, what next, how long to poll, the attach lines."""

from __future__ import annotations

import datetime

import pytest

from localproxy.connect.attach import MAX_LINE, Reply, Request
from localproxy.connect.plan import (
    Next,
    TunnelView,
    choose_tunnel,
    next_step,
    not_connected_advice,
    poll_delays,
)


def view(tid: str, *, open: bool = True, thing: str = "dev", services: tuple[str, ...] = ("SSH",),
         source: bool = False, destination: bool = False, created: float = 0.0) -> TunnelView:  # fmt: skip
    return TunnelView(tid, open, thing, services, source, destination, created)


def test_from_description_reads_states_services_and_datetimes() -> None:
    described = {
        "tunnelId": "t1", "status": "OPEN",
        "destinationConfig": {"thingName": "dev", "services": ["SSH", "VNC"]},
        "sourceConnectionState": {"status": "DISCONNECTED"},
        "destinationConnectionState": {"status": "CONNECTED"},
        "createdAt": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    }  # fmt: skip
    got = TunnelView.from_description(described)
    assert got == TunnelView("t1", True, "dev", ("SSH", "VNC"), False, True, got.created_at)
    assert got.created_at == pytest.approx(1767225600.0)
    bare = TunnelView.from_description({"tunnelId": "t2", "status": "CLOSED"})
    assert bare == TunnelView("t2", False, None, (), False, False, 0.0)


def test_no_tunnel_of_the_thing_with_the_service_opens_one() -> None:
    tunnels = [view("other-thing", thing="x"), view("vnc-only", services=("VNC",)), view("closed", open=False)]
    choice = choose_tunnel(tunnels, "dev", "SSH")
    assert choice.tunnel is None and "opening one" in choice.note


def test_reuses_a_free_open_tunnel_preferring_a_connected_device_then_the_newest() -> None:
    tunnels = [view("old", created=1), view("new", created=2), view("device-on", destination=True, created=0)]
    assert choose_tunnel(tunnels, "dev", "SSH").tunnel == tunnels[2]
    assert choose_tunnel(tunnels[:2], "dev", "SSH").tunnel == tunnels[1]
    assert "no new tunnel" in choose_tunnel(tunnels, "dev", "SSH").note


def test_never_takes_a_tunnel_whose_source_another_proxy_holds() -> None:
    held = view("held", source=True, destination=True)
    choice = choose_tunnel([held], "dev", "SSH")
    assert choice.tunnel is None and "rather than disconnecting" in choice.note
    # ...unless it was our own previous shared source (the service may not have noticed it left).
    assert choose_tunnel([held, view("free")], "dev", "SSH", own_tunnel_id="held").tunnel == held


def test_next_step() -> None:
    assert next_step(view("t", open=False, destination=True), False) is Next.CLOSED
    assert next_step(view("t", destination=True), False) is Next.READY
    assert next_step(view("t"), False) is Next.ROTATE_DESTINATION
    assert next_step(view("t"), True) is Next.WAIT


@pytest.mark.parametrize("wait", [0.0, 0.05, 1.0, 7.3, 60.0])
def test_poll_delays_sum_to_the_wait_and_grow_to_the_cap(wait: float) -> None:
    delays = list(poll_delays(wait))
    assert sum(delays) == pytest.approx(wait)
    assert all(0 < d <= 1.0 for d in delays)
    assert delays == sorted(delays[:-1]) + delays[-1:]  # growing (the last one may be cut short)


def test_advice_names_the_topic_and_the_wait() -> None:
    text = not_connected_advice("dev", "t1", 5)
    assert "$aws/things/dev/tunnels/notify" in text and "5 s" in text and "--wait" in text


def test_attach_lines_round_trip_and_reject_garbage() -> None:
    request = Request("SSH", 12.5, True)
    assert Request.decode(request.encode()) == request
    for reply in (Reply(say="hi"), Reply(ok=True), Reply(error="no", code=9)):
        assert Reply.decode(reply.encode()) == reply
    bad = [b"", b"{}\n", b"[1]\n", b"not json\n", b'{"v": 1, "service": "SSH", "wait": -1}\n',
           b'{"v": 1, "service": "", "wait": 1}\n', b'{"v": 2, "service": "SSH", "wait": 1}\n',
           b'{"v": 1, "service": "SSH", "wait": true}\n', b'{"v": 1, "service": "SSH", "wait": 1}',
           b"\xff\n", b" " * MAX_LINE + b"\n"]  # fmt: skip
    for line in bad:
        with pytest.raises(ValueError):
            Request.decode(line)
    with pytest.raises(ValueError):
        Reply.decode(b'{"code": 3}\n')
