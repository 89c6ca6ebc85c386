"""Device agent, sans-I/O: notification validation and the tunnel planner's decisions."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("aiomqtt", reason="needs the mqtt extra")  # absent in tools/test_newest_websockets.py

from hypothesis import given, settings
from hypothesis import strategies as st

from localproxy.agent.notify import (
    MAX_NOTIFICATION_BYTES,
    InvalidNotification,
    Notification,
    notify_topic,
    parse_notification,
)
from localproxy.agent.plan import (
    Ignore,
    Reject,
    Start,
    Stop,
    StopReason,
    TunnelPlanner,
    WhenFull,
    tunnel_key,
    tunnel_label,
)
from localproxy.errors import UsageError
from localproxy.types import V1_SERVICE, DestinationTarget

TOKEN = "AQGAAXj-secret-destination-token-Zm9vYmFy"
SSH = DestinationTarget("localhost", 22)
VNC = DestinationTarget("127.0.0.1", 5900)


def payload(**overrides: Any) -> bytes:
    document: dict[str, Any] = {
        "clientAccessToken": TOKEN,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    }
    for key, value in overrides.items():
        if value is ...:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document).encode()


def token_payload(token: str, services: list[str], region: str = "us-east-1") -> bytes:
    return payload(clientAccessToken=token, services=services, region=region)


# --- parse_notification ----------------------------------------------------------------


def test_the_service_payload_parses_and_hides_the_token_in_repr() -> None:
    notification = parse_notification(payload(services=["SSH", "VNC"]))
    assert notification == Notification(TOKEN, "us-east-1", ("SSH", "VNC"))
    assert TOKEN not in repr(notification)
    assert len(notification.token_digest) == 64 and TOKEN not in notification.token_digest


def test_unknown_members_are_ignored_and_str_payloads_accepted() -> None:
    notification = parse_notification(payload(tunnelId="t-1", extra={"a": 1}).decode())
    assert notification.services == ("SSH",)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"{not json", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON array, not an object"),
        (b'"text"', "JSON string, not an object"),
        (b"null", "JSON null"),
        (payload(clientAccessToken=...), "clientAccessToken is missing"),
        (payload(clientAccessToken=""), "clientAccessToken is missing or not a non-empty string"),
        (payload(clientAccessToken=123), "not a non-empty string"),
        (payload(clientAccessToken="a" * 4097), "longer than 4096"),
        (payload(clientAccessToken="abc\ndef"), "control characters"),
        (payload(clientMode="source"), "clientMode is 'source', expected 'destination'"),
        (payload(clientMode="DESTINATION"), "clientMode is 'DESTINATION'"),
        (payload(clientMode=...), "clientMode is missing"),
        (payload(region="US-EAST-1"), "region"),
        (payload(region="us_east_1"), "^[a-z0-9-]+$"),
        (payload(region=...), "region is missing"),
        (payload(region=""), "region"),
        (payload(services=...), "services is missing or not a list"),
        (payload(services="SSH"), "not a list"),
        (payload(services=[]), "lists 0 service ids, expected 1 to 3"),
        (payload(services=["A", "B", "C", "D"]), "lists 4 service ids"),
        (payload(services=["SSH", "SSH"]), "lists SSH twice"),
        (payload(services=["SS H"]), "not a service id"),
        (payload(services=[22]), "not a service id"),
        (b" " * (MAX_NOTIFICATION_BYTES + 1), "too large"),
    ],
)
def test_malformed_notifications_are_rejected_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(InvalidNotification) as info:
        parse_notification(data)
    assert why in str(info.value)
    assert TOKEN not in str(info.value)


def test_a_token_placed_in_other_fields_is_never_quoted() -> None:
    for data in (
        payload(clientMode=TOKEN),
        payload(region=TOKEN),
        payload(services=[TOKEN + "!"]),
        payload(services=[{"id": TOKEN}]),
    ):
        with pytest.raises(InvalidNotification) as info:
            parse_notification(data)
        assert TOKEN not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        notification = parse_notification(data)
    except InvalidNotification as error:
        assert str(error)
    else:
        assert notification.access_token and 1 <= len(notification.services) <= 3


def test_notify_topic_and_thing_name_check() -> None:
    assert notify_topic("RemoteThing1") == "$aws/things/RemoteThing1/tunnels/notify"
    assert notify_topic("t", "lab/{thing}/notify") == "lab/t/notify"
    for bad in ("", "a/b", "a+b", "#", "x" * 129):
        with pytest.raises(UsageError):
            notify_topic(bad)


# --- TunnelPlanner ---------------------------------------------------------------------


def planner(max_tunnels: int = 4, when_full: WhenFull = WhenFull.EVICT_OLDEST, **services: DestinationTarget) -> TunnelPlanner:
    return TunnelPlanner(services or {"SSH": SSH, "VNC": VNC}, max_tunnels, when_full)


def test_first_notification_starts_a_proxy_with_the_mapped_services() -> None:
    plan = planner()
    [start] = plan.on_notification(token_payload("t1", ["VNC", "SSH"]))
    assert isinstance(start, Start)
    assert start.key == ("us-east-1", ("SSH", "VNC")) and start.replaces is None
    assert dict(start.targets) == {"VNC": VNC, "SSH": SSH}
    assert start.notification.access_token == "t1"
    assert plan.running == {start.key: start.generation}
    assert tunnel_label(start.key) == "SSH+VNC@us-east-1"


def test_a_new_token_for_the_same_service_set_replaces_stop_first() -> None:
    plan = planner()
    [first] = plan.on_notification(token_payload("t1", ["SSH", "VNC"]))
    actions = plan.on_notification(token_payload("t2", ["VNC", "SSH"]))  # same set, other order
    assert [type(a) for a in actions] == [Stop, Start]
    stop, start = actions
    assert isinstance(stop, Stop) and isinstance(start, Start)
    assert stop == Stop(first.key, first.generation, StopReason.REPLACED)
    assert start.key == first.key and start.replaces == first.generation
    assert start.generation > first.generation
    assert plan.running == {first.key: start.generation}


def test_duplicates_are_ignored_even_after_a_rotation() -> None:
    plan = planner()
    plan.on_notification(token_payload("t1", ["SSH"]))
    [ignored] = plan.on_notification(token_payload("t1", ["SSH"]))
    assert isinstance(ignored, Ignore) and "duplicate" in ignored.reason
    plan.on_notification(token_payload("t2", ["SSH"]))
    # QoS 1 may redeliver the older one late: it must not replace the newer proxy.
    assert isinstance(plan.on_notification(token_payload("t1", ["SSH"]))[0], Ignore)


def test_seen_tokens_are_bounded() -> None:
    plan = TunnelPlanner({"SSH": SSH}, seen_limit=3)
    for index in range(5):
        plan.on_notification(token_payload(f"t{index}", ["SSH"]))
    assert isinstance(plan.on_notification(token_payload("t4", ["SSH"]))[0], Ignore)
    assert isinstance(plan.on_notification(token_payload("t0", ["SSH"]))[-1], Start)  # forgotten


def test_unknown_services_are_rejected_without_effect() -> None:
    plan = planner(SSH=SSH)
    [reject] = plan.on_notification(token_payload("t1", ["SSH", "RDP"]))
    assert isinstance(reject, Reject)
    assert "no mapping for service(s) RDP" in reject.reason and "serves: SSH" in reject.reason
    assert reject.services == ("SSH", "RDP")
    assert plan.running == {}


def test_malformed_payloads_are_rejected_without_effect() -> None:
    plan = planner()
    [reject] = plan.on_notification(b'{"clientMode":"destination"}')
    assert isinstance(reject, Reject) and "clientAccessToken" in reject.reason
    assert plan.running == {}


def test_the_unnamed_mapping_serves_any_single_service_tunnel() -> None:
    plan = TunnelPlanner({V1_SERVICE: SSH})
    [start] = plan.on_notification(token_payload("t1", ["SSH"]))
    assert isinstance(start, Start) and dict(start.targets) == {"SSH": SSH}
    [reject] = plan.on_notification(token_payload("t2", ["SSH", "VNC"]))
    assert isinstance(reject, Reject)


def test_regions_are_different_tunnels() -> None:
    plan = planner()
    plan.on_notification(token_payload("t1", ["SSH"], "us-east-1"))
    [start] = plan.on_notification(token_payload("t2", ["SSH"], "eu-west-1"))
    assert isinstance(start, Start) and start.replaces is None and len(plan.running) == 2


def test_beyond_max_tunnels_the_least_recently_started_is_evicted() -> None:
    plan = TunnelPlanner({"A": SSH, "B": SSH, "C": SSH}, max_tunnels=2)
    [a] = plan.on_notification(token_payload("a1", ["A"]))
    [b] = plan.on_notification(token_payload("b1", ["B"]))
    plan.on_notification(token_payload("a2", ["A"]))  # A rotated: now B is the oldest
    actions = plan.on_notification(token_payload("c1", ["C"]))
    assert isinstance(actions[0], Stop) and actions[0].key == b.key and actions[0].reason is StopReason.EVICTED
    assert isinstance(actions[1], Start)
    assert set(plan.running) == {a.key, actions[1].key}


def test_beyond_max_tunnels_refuse_policy_rejects_but_rotations_still_work() -> None:
    plan = TunnelPlanner({"A": SSH, "B": SSH}, max_tunnels=1, when_full=WhenFull.REFUSE)
    [a] = plan.on_notification(token_payload("a1", ["A"]))
    [reject] = plan.on_notification(token_payload("b1", ["B"]))
    assert isinstance(reject, Reject) and "--max-tunnels" in reject.reason
    assert [type(x) for x in plan.on_notification(token_payload("a2", ["A"]))] == [Stop, Start]
    assert list(plan.running) == [a.key]


def test_proxy_end_removes_only_the_current_generation() -> None:
    plan = planner()
    [first] = plan.on_notification(token_payload("t1", ["SSH"]))
    _, second = plan.on_notification(token_payload("t2", ["SSH"]))
    assert isinstance(first, Start) and isinstance(second, Start)
    assert plan.on_proxy_ended(first.key, first.generation) is False  # already replaced
    assert plan.on_proxy_ended(second.key, second.generation) is True
    assert plan.running == {}
    assert plan.on_proxy_ended(second.key, second.generation) is False


def test_stop_all_lists_every_running_proxy() -> None:
    plan = planner()
    plan.on_notification(token_payload("t1", ["SSH"]))
    plan.on_notification(token_payload("t2", ["VNC"]))
    stops = plan.stop_all()
    assert [s.reason for s in stops] == [StopReason.AGENT_STOPPING] * 2 and plan.running == {}


def test_planner_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        TunnelPlanner({"SSH": SSH}, max_tunnels=0)
    with pytest.raises(ValueError):
        TunnelPlanner({})


def test_tunnel_key_ignores_service_order() -> None:
    one = Notification("x", "us-east-1", ("B", "A"))
    two = Notification("y", "us-east-1", ("A", "B"))
    assert tunnel_key(one) == tunnel_key(two) == ("us-east-1", ("A", "B"))
