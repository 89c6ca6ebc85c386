"""The sans-I/O tunnel state machine: plain function calls, no event loop, no sockets."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from localproxy.config.proxy_config import ProxyConfig
from localproxy.errors import ConfigError, ProtocolError
from localproxy.events import (
    ConnectionRejected,
    ConnectionReset,
    ConnectionStarted,
    StreamReset,
    StreamStarted,
    TunnelReady,
)
from localproxy.settings import V1, V2, V3, Settings
from localproxy.tunnel.actions import (
    Close,
    Connect,
    DataFramer,
    Fatal,
    Hold,
    Listen,
    Log,
    Release,
    RestartSession,
    Send,
    SendData,
    StopListen,
    Write,
)
from localproxy.tunnel.services import resolve_services
from localproxy.tunnel.state import TunnelState
from localproxy.types import DestinationTarget, Mode, ServiceEndpoint, SourcePort
from localproxy.wire.codec import FrameDecoder, Message, MessageType

T = MessageType
SENDS = (Send, SendData)
SSH = DestinationTarget(host="127.0.0.1", port=22)
WEB = DestinationTarget(host="127.0.0.1", port=80)


# --- helpers -------------------------------------------------------------------


def sent(actions: Iterable[Any]) -> list[Message]:
    """Decode every Send/SendData action's frames, in order."""
    data = b"".join(bytes(part) for action in actions if isinstance(action, SENDS) for part in action.parts)
    return FrameDecoder().feed(data)


def of(actions: Iterable[Any], kind: type) -> list[Any]:
    return [action for action in actions if isinstance(action, kind)]


def msg(
    kind: MessageType | int, stream_id: int = 0, service_id: str = "", connection_id: int = 0, **kw: Any
) -> Message:
    return Message(type=kind, stream_id=stream_id, service_id=service_id, connection_id=connection_id, **kw)


def service_ids(*ids: str) -> Message:
    return Message(type=T.SERVICE_IDS, available_service_ids=ids)


def source(
    services: dict[str, Any] | None = None,
    ids: tuple[str, ...] | None = ("SSH",),
    subprotocol: str = V3,
    **kw: Any,
) -> TunnelState:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": SourcePort(5555)} if services is None else services, **kw)
    tunnel.session_started(subprotocol)
    if ids is not None and subprotocol != V1:
        out = tunnel.receive([service_ids(*ids)])
        assert not of(out, Fatal), out
    return tunnel


def destination(
    services: dict[str, Any] | None = None,
    ids: tuple[str, ...] | None = ("SSH",),
    subprotocol: str = V3,
    **kw: Any,
) -> TunnelState:
    tunnel = TunnelState(Mode.DESTINATION, {"SSH": SSH} if services is None else services, **kw)
    tunnel.session_started(subprotocol)
    if ids is not None and subprotocol != V1:
        out = tunnel.receive([service_ids(*ids)])
        assert not of(out, Fatal), out
    return tunnel


def written(actions: Iterable[Any]) -> dict[int, bytes]:
    result: dict[int, bytes] = {}
    for action in of(actions, Write):
        result[action.key] = result.get(action.key, b"") + bytes(action.data)
    return result


# --- service resolution (PROTOCOL.md 4.1) ----------------------------------------

RESOLVE_OK = [
    (Mode.SOURCE, {"SSH": SourcePort(5555)}, ["SSH"], {"SSH": SourcePort(5555)}),
    (Mode.SOURCE, {}, ["SSH", "WEB"], {"SSH": SourcePort(0), "WEB": SourcePort(0)}),
    (Mode.SOURCE, {"SSH": SourcePort(5555)}, ["SSH", "WEB"], {"SSH": SourcePort(5555)}),  # issue 22: configured only
    (Mode.SOURCE, {"": SourcePort(5555)}, ["SSH"], {"SSH": SourcePort(5555)}),
    (Mode.SOURCE, {"": SourcePort(5555)}, [], {"": SourcePort(5555)}),
    (Mode.SOURCE, {}, [], {"": SourcePort(0)}),
    (Mode.SOURCE, {"": SourcePort(5555)}, None, {"": SourcePort(5555)}),
    (Mode.SOURCE, {"SSH": SourcePort(5555)}, None, {"": SourcePort(5555)}),
    (Mode.SOURCE, {}, None, {"": SourcePort(0)}),
    (
        Mode.SOURCE,
        {"A": SourcePort(1), "B": SourcePort(2), "C": SourcePort(3)},
        ["C", "B", "A"],
        {"C": SourcePort(3), "B": SourcePort(2), "A": SourcePort(1)},
    ),
    (Mode.SOURCE, {"SSH": SourcePort(1)}, ["SSH", "SSH"], {"SSH": SourcePort(1)}),
    (Mode.DESTINATION, {"SSH": SSH}, ["SSH"], {"SSH": SSH}),
    (Mode.DESTINATION, {"": SSH}, ["SSH"], {"SSH": SSH}),
    (Mode.DESTINATION, {"": SSH}, [], {"": SSH}),
    (Mode.DESTINATION, {"SSH": SSH, "WEB": WEB}, ["WEB", "SSH"], {"WEB": WEB, "SSH": SSH}),
    (Mode.DESTINATION, {"SSH": SSH}, None, {"": SSH}),
    (Mode.DESTINATION, {"": SSH}, None, {"": SSH}),
]


@pytest.mark.parametrize("mode,configured,ids,expected", RESOLVE_OK)
def test_resolve_services_ok(mode: Mode, configured: dict, ids: list | None, expected: dict) -> None:
    resolved = resolve_services(mode, configured, ids)
    assert resolved == expected
    assert list(resolved) == list(expected)


RESOLVE_BAD = [
    (Mode.SOURCE, {"SSH3": SourcePort(1)}, ["SSH1", "SSH2"], "SSH3"),
    (Mode.SOURCE, {"": SourcePort(1)}, ["A", "B"], "several services"),
    (Mode.SOURCE, {"SSH": SourcePort(1)}, [], "not services of the tunnel"),
    (Mode.SOURCE, {"A": SourcePort(1), "B": SourcePort(2)}, None, "single service"),
    (Mode.SOURCE, {"": SourcePort(1), "A": SourcePort(2)}, ["A"], "mixed"),
    (Mode.DESTINATION, {"SSH": SSH}, ["SSH", "WEB"], "WEB"),
    (Mode.DESTINATION, {}, ["SSH"], "SSH"),
    (Mode.DESTINATION, {}, [], "No destination"),
    (Mode.DESTINATION, {}, None, "No destination"),
    (Mode.DESTINATION, {"X": SSH}, ["SSH"], "X"),
    (Mode.DESTINATION, {"": SSH}, ["A", "B"], "-d A=..."),
    (Mode.DESTINATION, {"SSH": SourcePort(22)}, ["SSH"], "DestinationTarget"),
    (Mode.SOURCE, {"SSH": SSH}, ["SSH"], "SourcePort"),
]


@pytest.mark.parametrize("mode,configured,ids,needle", RESOLVE_BAD)
def test_resolve_services_config_errors(mode: Mode, configured: dict, ids: list | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_services(mode, configured, ids)


def test_service_ids_mismatch_is_fatal_config_error() -> None:
    tunnel = TunnelState(Mode.DESTINATION, {"SSH": SSH})
    tunnel.session_started(V3)
    out = tunnel.receive([service_ids("SSH", "WEB"), msg(T.STREAM_START, 1, "SSH", 1)])
    (fatal,) = of(out, Fatal)
    assert isinstance(fatal.error, ConfigError) and fatal.error.exit_code == 2
    assert "WEB" in str(fatal.error)


def test_source_listens_after_service_ids_only_once_across_sessions() -> None:
    tunnel = TunnelState(Mode.SOURCE, {})  # no mapping: every service (up to 3), on picked ports
    assert tunnel.session_started(V3) == []
    out = tunnel.receive([service_ids("SSH", "WEB")])
    assert of(out, Listen) == [Listen("SSH", 0), Listen("WEB", 0)]
    assert of(out, TunnelReady) == [TunnelReady(("SSH", "WEB"))]
    tunnel.session_lost()
    tunnel.session_started(V3)
    out = tunnel.receive([service_ids("SSH")])
    assert of(out, Listen) == []
    assert of(out, StopListen) == [StopListen("WEB")]
    assert of(out, TunnelReady) == [TunnelReady(("SSH",))]


def test_v1_session_serves_single_mapping_at_once() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"": SourcePort(5555)})
    out = tunnel.session_started(V1)
    assert of(out, Listen) == [Listen("", 5555)]
    assert of(out, TunnelReady) == [TunnelReady(("",))]


def test_unknown_subprotocol_is_fatal() -> None:
    tunnel = TunnelState(Mode.SOURCE, {})
    (fatal,) = tunnel.session_started("chat")
    assert isinstance(fatal, Fatal) and isinstance(fatal.error, ProtocolError)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigError):
        TunnelState(Mode.SOURCE, {}, destination_client_type="V9")
    with pytest.raises(ConfigError):
        TunnelState(Mode.SOURCE, {}, max_payload_size=70000)


def test_from_config_takes_settings() -> None:
    config = ProxyConfig(
        mode=Mode.SOURCE,
        access_token="t",
        endpoint=ServiceEndpoint.parse("ws://127.0.0.1:1"),
        services={"SSH": SourcePort(0)},
        destination_client_type="V2",
        settings=Settings(tcp_max_active_connections=1, max_payload_size=100),
    )
    tunnel = TunnelState.from_config(config)
    tunnel.session_started(V3)
    tunnel.receive([service_ids("SSH")])
    key, out = tunnel.local_opened("SSH")
    (start,) = sent(out)
    assert start.connection_id == 0  # -y V2
    assert len(sent(tunnel.local_data(key, b"x" * 250))) == 3  # 100-byte payloads
    _, out = tunnel.local_opened("SSH")
    assert of(out, Close) and of(out, ConnectionRejected)  # limit 1


# --- source: streams and connections ---------------------------------------------


def test_source_first_connection_sends_stream_start() -> None:
    tunnel = source()
    key, out = tunnel.local_opened("SSH")
    assert sent(out) == [msg(T.STREAM_START, 1, "SSH", 1)]
    assert StreamStarted("SSH", 1) in out and ConnectionStarted("SSH", 1, 1) in out
    assert tunnel.active_stream("SSH") == 1
    assert tunnel.connection_ids(key) == ("SSH", 1, 1)


def test_source_v3_more_connections_use_connection_start() -> None:
    tunnel = source()
    tunnel.local_opened("SSH")
    outs = [tunnel.local_opened("SSH")[1] for _ in range(3)]
    assert [sent(out) for out in outs] == [[msg(T.CONNECTION_START, 1, "SSH", n)] for n in (2, 3, 4)]


def test_source_data_frames_carry_service_stream_and_connection() -> None:
    tunnel = source()
    tunnel.local_opened("SSH")
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.local_data(key, b"hello")
    assert sent(out) == [
        Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"hello")
    ]


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 64511, 64512, 64513, 129024, 200000])
def test_source_data_split_at_max_payload(size: int) -> None:
    tunnel = source()
    key, _ = tunnel.local_opened("SSH")
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    messages = sent(tunnel.local_data(key, data))
    assert all(len(bytes(m.payload)) <= 64512 for m in messages)
    assert len(messages) == -(-size // 64512)
    assert b"".join(bytes(m.payload) for m in messages) == data


def test_source_data_of_memoryview_and_bytearray() -> None:
    tunnel = source(max_payload_size=10)
    key, _ = tunnel.local_opened("SSH")
    for data in (memoryview(b"a" * 25), bytearray(b"b" * 25)):
        messages = sent(tunnel.local_data(key, data))
        assert [len(bytes(m.payload)) for m in messages] == [10, 10, 5]


def test_data_framer_matches_encode_frame() -> None:
    from localproxy.wire.codec import encode_frame

    for service, connection in (("", 0), ("SSH", 0), ("SSH", 7), ("", 300)):
        framer = DataFramer(12345, service, connection, 64512)
        payload = b"z" * 300
        joined = b"".join(bytes(p) for p in framer.frames(payload))
        expected = Message(
            type=T.DATA, stream_id=12345, service_id=service, connection_id=connection, payload=payload
        )
        assert FrameDecoder().feed(joined) == [expected]
        assert len(joined) == len(encode_frame(expected))


def test_source_close_of_one_of_several_sends_connection_reset() -> None:
    tunnel = source()
    first, _ = tunnel.local_opened("SSH")
    tunnel.local_opened("SSH")
    out = tunnel.local_closed(first)
    assert sent(out) == [msg(T.CONNECTION_RESET, 1, "SSH", 1)]
    assert ConnectionReset("SSH", 1, 1, "local") in out
    assert tunnel.active_stream("SSH") == 1


def test_source_close_of_last_connection_sends_stream_reset_and_next_starts_new_stream() -> None:
    tunnel = source()
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.local_closed(key)
    assert sent(out) == [msg(T.STREAM_RESET, 1, "SSH")]
    assert StreamReset("SSH", 1, "local") in out
    assert tunnel.active_stream("SSH") is None
    _, out = tunnel.local_opened("SSH")
    assert sent(out) == [msg(T.STREAM_START, 2, "SSH", 1)]


def test_source_close_twice_and_unknown_key_are_ignored() -> None:
    tunnel = source()
    key, _ = tunnel.local_opened("SSH")
    tunnel.local_closed(key)
    assert tunnel.local_closed(key) == []
    assert tunnel.local_closed(999) == []
    assert tunnel.local_data(999, b"x") == []


def test_stream_ids_grow_across_services_and_reconnects() -> None:
    tunnel = source({}, ids=("A", "B"))
    starts = []
    for session in range(3):
        for service in ("A", "B"):
            key, out = tunnel.local_opened(service)
            starts += [m.stream_id for m in sent(out)]
        tunnel.session_lost()
        tunnel.session_started(V3)
        tunnel.receive([service_ids("A", "B")])
    assert starts == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "subprotocol,client_type,service_on_wire,connection_ids",
    [
        (V3, None, True, True),
        (V3, "V2", True, False),
        (V3, "V1", False, False),
        (V2, None, True, False),
        (V2, "V1", False, False),
        (V1, None, False, False),
    ],
)
def test_source_versions_shape_messages(
    subprotocol: str, client_type: str | None, service_on_wire: bool, connection_ids: bool
) -> None:
    services = {"": SourcePort(1)} if subprotocol == V1 else {"SSH": SourcePort(1)}
    tunnel = source(services, subprotocol=subprotocol, destination_client_type=client_type)
    service = "" if subprotocol == V1 else "SSH"
    key, out = tunnel.local_opened(service)
    out += tunnel.local_data(key, b"abc")
    out += tunnel.local_closed(key)
    messages = sent(out)
    assert [m.type for m in messages] == [T.STREAM_START, T.DATA, T.STREAM_RESET]
    for m in messages:
        assert m.service_id == ("SSH" if service_on_wire else "")
        assert m.connection_id == (1 if connection_ids and m.type != T.STREAM_RESET else 0)


def test_source_y_v1_with_several_services_is_fatal() -> None:
    tunnel = TunnelState(Mode.SOURCE, {}, destination_client_type="V1")
    tunnel.session_started(V3)
    (fatal,) = of(tunnel.receive([service_ids("A", "B")]), Fatal)
    assert isinstance(fatal.error, ConfigError) and "V1" in str(fatal.error)


def test_source_y_v1_receives_messages_without_service_id() -> None:
    tunnel = source(destination_client_type="V1")
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.receive([Message(type=T.DATA, stream_id=1, payload=b"hi")])
    assert written(out) == {key: b"hi"}
    out = tunnel.receive([msg(T.STREAM_RESET, 1)])
    assert of(out, Close) == [Close(key, True)]


# --- source: V1/V2 one connection per stream: the hold queue ----------------------


def test_source_v2_second_connection_is_held_then_released() -> None:
    tunnel = source(destination_client_type="V2")
    first, _ = tunnel.local_opened("SSH")
    second, out = tunnel.local_opened("SSH")
    assert of(out, Hold) == [Hold(second)] and sent(out) == []
    assert tunnel.connection_ids(second) is None
    assert tunnel.local_data(second, b"early") == []  # kept until its stream starts
    out = tunnel.local_closed(first)
    assert sent(out) == [
        msg(T.STREAM_RESET, 1, "SSH"),
        msg(T.STREAM_START, 2, "SSH"),
        Message(type=T.DATA, stream_id=2, service_id="SSH", payload=b"early"),
    ]
    assert out.index(Release(second)) > max(out.index(a) for a in out if isinstance(a, SENDS))
    assert tunnel.connection_ids(second) == ("SSH", 2, 1)


def test_source_v2_held_connection_released_on_peer_reset() -> None:
    tunnel = source(destination_client_type="V2")
    first, _ = tunnel.local_opened("SSH")
    second, _ = tunnel.local_opened("SSH")
    third, _ = tunnel.local_opened("SSH")
    out = tunnel.receive([msg(T.STREAM_RESET, 1, "SSH")])
    assert of(out, Close) == [Close(first, True)]
    assert sent(out) == [msg(T.STREAM_START, 2, "SSH")]
    assert of(out, Release) == [Release(second)]
    out = tunnel.receive([msg(T.SESSION_RESET)])
    assert of(out, Close) == [Close(second, True)] and of(out, Release) == [Release(third)]


def test_source_v2_held_connection_closing_is_silent() -> None:
    tunnel = source(destination_client_type="V2")
    first, _ = tunnel.local_opened("SSH")
    second, _ = tunnel.local_opened("SSH")
    third, _ = tunnel.local_opened("SSH")
    assert tunnel.local_closed(second) == []
    out = tunnel.local_closed(first)
    assert of(out, Release) == [Release(third)]


def test_source_held_connections_closed_when_session_lost() -> None:
    tunnel = source(destination_client_type="V2")
    first, _ = tunnel.local_opened("SSH")
    second, _ = tunnel.local_opened("SSH")
    out = tunnel.session_lost()
    assert sorted(c.key for c in of(out, Close)) == [first, second]
    assert sent(out) == []


# --- source: receiving --------------------------------------------------------------


def test_source_receives_data_for_each_connection() -> None:
    tunnel = source()
    a, _ = tunnel.local_opened("SSH")
    b, _ = tunnel.local_opened("SSH")
    out = tunnel.receive(
        [
            Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"to-a"),
            Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"to-b"),
            Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=0, payload=b"+a"),  # 0 means 1
        ]
    )
    assert written(out) == {a: b"to-a+a", b: b"to-b"}


@pytest.mark.parametrize(
    "stale",
    [
        Message(type=T.DATA, stream_id=2, service_id="SSH", connection_id=1, payload=b"x"),
        Message(type=T.DATA, stream_id=1, service_id="WEB", connection_id=1, payload=b"x"),
        Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=9, payload=b"x"),
        Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b""),
        Message(type=T.STREAM_RESET, stream_id=7, service_id="SSH"),
        Message(type=T.CONNECTION_RESET, stream_id=7, service_id="SSH", connection_id=1),
        Message(type=T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=5),
        Message(type=T.STREAM_RESET, stream_id=1, service_id="OTHER"),
    ],
)
def test_source_drops_stale_messages_silently(stale: Message) -> None:
    tunnel = source()
    tunnel.local_opened("SSH")
    assert tunnel.receive([stale]) == []
    assert tunnel.active_stream("SSH") == 1


def test_data_without_service_id_maps_to_the_single_service() -> None:
    tunnel = source()
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.receive([Message(type=T.DATA, stream_id=1, connection_id=1, payload=b"v1")])
    assert written(out) == {key: b"v1"}


def test_data_without_service_id_is_dropped_with_several_services() -> None:
    tunnel = source({}, ids=("A", "B"))
    tunnel.local_opened("A")
    assert tunnel.receive([Message(type=T.DATA, stream_id=1, connection_id=1, payload=b"?")]) == []


def test_source_stream_reset_closes_all_connections_with_flush() -> None:
    tunnel = source()
    keys = [tunnel.local_opened("SSH")[0] for _ in range(3)]
    out = tunnel.receive(
        [
            Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"last words"),
            msg(T.STREAM_RESET, 1, "SSH"),
        ]
    )
    assert of(out, Write)[0].key == keys[1]
    assert of(out, Close) == [Close(k, True) for k in keys]
    assert out.index(of(out, Write)[0]) < out.index(Close(keys[1], True))
    assert sent(out) == []  # no reply to a reset
    assert tunnel.active_stream("SSH") is None
    _, out = tunnel.local_opened("SSH")
    assert sent(out)[0].type == T.STREAM_START


def test_source_connection_reset_closes_one_and_last_one_ends_stream() -> None:
    tunnel = source()
    a, _ = tunnel.local_opened("SSH")
    b, _ = tunnel.local_opened("SSH")
    out = tunnel.receive([msg(T.CONNECTION_RESET, 1, "SSH", 1)])
    assert of(out, Close) == [Close(a, True)] and sent(out) == []
    out = tunnel.receive([msg(T.CONNECTION_RESET, 1, "SSH", 2)])
    assert of(out, Close) == [Close(b, True)]
    assert sent(out) == [msg(T.STREAM_RESET, 1, "SSH")]
    assert tunnel.active_stream("SSH") is None


def test_session_reset_closes_every_stream_of_every_service() -> None:
    tunnel = source({}, ids=("A", "B", "C"))
    keys = [tunnel.local_opened(s)[0] for s in ("A", "B", "C", "A")]
    out = tunnel.receive([msg(T.SESSION_RESET)])
    assert sorted(c.key for c in of(out, Close)) == sorted(keys)
    assert all(c.flush for c in of(out, Close))
    assert sent(out) == []
    assert [tunnel.active_stream(s) for s in "ABC"] == [None, None, None]
    assert tunnel.connection_count() == 0


def test_session_reset_without_streams_is_harmless() -> None:
    assert source().receive([msg(T.SESSION_RESET)]) == []


@pytest.mark.parametrize("reconnect,expected", [(True, RestartSession), (False, Fatal)])
def test_source_receiving_stream_start_is_a_data_error(reconnect: bool, expected: type) -> None:
    tunnel = source(reconnect_on_data_error=reconnect)
    out = tunnel.receive([msg(T.STREAM_START, 5, "SSH", 1), msg(T.SESSION_RESET)])
    (action,) = of(out, expected)
    assert isinstance(action.error, ProtocolError)
    assert not tunnel.session_active
    assert tunnel.receive([msg(T.SERVICE_IDS)]) == []  # ignored until the next session


def test_source_receiving_connection_start_closes_that_connection() -> None:
    tunnel = source()
    a, _ = tunnel.local_opened("SSH")
    b, _ = tunnel.local_opened("SSH")
    out = tunnel.receive([msg(T.CONNECTION_START, 1, "SSH", 2)])
    assert Close(b, False) in out
    assert sent(out) == [msg(T.CONNECTION_RESET, 1, "SSH", 2)]
    assert tunnel.connection_ids(a) == ("SSH", 1, 1)


def test_unknown_ignorable_type_is_skipped() -> None:
    tunnel = source()
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.receive(
        [msg(42, ignorable=True), Message(type=T.DATA, stream_id=1, service_id="SSH", payload=b"ok")]
    )
    assert written(out) == {key: b"ok"}
    assert of(out, Log)[0].level == logging.DEBUG


@pytest.mark.parametrize("reconnect,expected", [(True, RestartSession), (False, Fatal)])
def test_unknown_type_not_ignorable_is_a_data_error(reconnect: bool, expected: type) -> None:
    tunnel = source(reconnect_on_data_error=reconnect)
    key, _ = tunnel.local_opened("SSH")
    out = tunnel.receive(
        [
            Message(type=T.DATA, stream_id=1, service_id="SSH", payload=b"before"),
            msg(42),
            Message(type=T.DATA, stream_id=1, service_id="SSH", payload=b"after"),
        ]
    )
    assert written(out) == {key: b"before"}  # the rest of the batch is not processed
    assert len(of(out, expected)) == 1
    assert "42" in str(of(out, expected)[0].error)


@pytest.mark.parametrize("kind", [T.DATA, T.STREAM_RESET, T.CONNECTION_RESET, T.CONNECTION_START])
def test_stream_bound_message_with_stream_id_zero_is_a_data_error(kind: MessageType) -> None:
    tunnel = source()
    tunnel.local_opened("SSH")
    out = tunnel.receive([msg(kind, 0, "SSH", 1)])
    assert len(of(out, RestartSession)) == 1


def test_data_error_entry_point() -> None:
    assert isinstance(source().data_error(ProtocolError("text frame"))[-1], RestartSession)
    assert isinstance(source(reconnect_on_data_error=False).data_error(ProtocolError("x"))[-1], Fatal)


def test_messages_before_session_are_ignored() -> None:
    tunnel = TunnelState(Mode.SOURCE, {})
    assert tunnel.receive([service_ids("SSH")]) == []


# --- source: limits and no session --------------------------------------------------


def test_source_max_active_connections_closes_the_new_one() -> None:
    tunnel = source(max_active_connections=2)
    tunnel.local_opened("SSH")
    tunnel.local_opened("SSH")
    key, out = tunnel.local_opened("SSH")
    assert of(out, Close) == [Close(key, False)]
    assert sent(out) == []
    assert of(out, Log)[0].level == logging.WARNING
    assert "max_active_connections" in of(out, Log)[0].message
    assert tunnel.connection_count("SSH") == 2


def test_source_max_active_connections_is_per_service() -> None:
    tunnel = source({}, ids=("A", "B"), max_active_connections=1)
    assert not of(tunnel.local_opened("A")[1], Close)
    assert not of(tunnel.local_opened("B")[1], Close)
    assert of(tunnel.local_opened("A")[1], Close)


def test_source_max_counts_held_connections() -> None:
    tunnel = source(destination_client_type="V2", max_active_connections=2)
    tunnel.local_opened("SSH")
    assert of(tunnel.local_opened("SSH")[1], Hold)
    assert of(tunnel.local_opened("SSH")[1], Close)


def test_source_connection_without_session_is_closed() -> None:
    tunnel = source()
    tunnel.session_lost()
    key, out = tunnel.local_opened("SSH")
    assert of(out, Close) == [Close(key, False)] and of(out, ConnectionRejected)
    tunnel.session_started(V3)  # services known from the previous session: served at once
    _, out = tunnel.local_opened("SSH")
    assert sent(out)[0].type == T.STREAM_START


def test_source_connection_before_service_ids_is_closed() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": SourcePort(1)})
    tunnel.session_started(V3)
    key, out = tunnel.local_opened("SSH")
    assert of(out, Close) == [Close(key, False)]


def test_session_lost_closes_everything_and_forgets_streams() -> None:
    tunnel = source({}, ids=("A", "B"))
    keys = [tunnel.local_opened(s)[0] for s in ("A", "A", "B")]
    out = tunnel.session_lost()
    assert out == [Close(key, False) for key in keys]  # reset: the stream broke
    assert tunnel.connection_count() == 0 and not tunnel.session_active
    assert tunnel.receive([Message(type=T.DATA, stream_id=1, service_id="A", payload=b"x")]) == []


# --- destination ------------------------------------------------------------------


def test_destination_stream_start_connects() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)])
    (connect,) = of(out, Connect)
    assert connect.target == SSH and connect.service_id == "SSH"
    assert StreamStarted("SSH", 7) in out and ConnectionStarted("SSH", 7, 1) in out
    assert sent(out) == []  # no reply on success
    assert tunnel.active_stream("SSH") == 7


def test_destination_data_before_connected_is_written_in_order() -> None:
    tunnel = destination()
    out = tunnel.receive(
        [
            msg(T.STREAM_START, 7, "SSH", 1),
            Message(type=T.DATA, stream_id=7, service_id="SSH", connection_id=1, payload=b"early"),
        ]
    )
    key = of(out, Connect)[0].key
    assert written(out) == {key: b"early"}
    assert tunnel.connect_result(key, True) == []
    out = tunnel.local_data(key, b"reply")
    assert sent(out) == [
        Message(type=T.DATA, stream_id=7, service_id="SSH", connection_id=1, payload=b"reply")
    ]


def test_destination_connect_failure_for_stream_start_sends_stream_reset() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    out = tunnel.connect_result(key, False)
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")]
    assert of(out, ConnectionRejected)
    assert tunnel.active_stream("SSH") is None


def test_destination_connect_failure_for_connection_start_sends_connection_reset() -> None:
    tunnel = destination()
    first = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    tunnel.connect_result(first, True)
    second = of(tunnel.receive([msg(T.CONNECTION_START, 7, "SSH", 2)]), Connect)[0].key
    out = tunnel.connect_result(second, False)
    assert sent(out) == [msg(T.CONNECTION_RESET, 7, "SSH", 2)]
    assert tunnel.active_stream("SSH") == 7 and tunnel.connection_count("SSH") == 1


def test_destination_connect_failure_of_stream_start_closes_later_connections() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.CONNECTION_START, 7, "SSH", 2)])
    first, second = (c.key for c in of(out, Connect))
    tunnel.connect_result(second, True)
    out = tunnel.connect_result(first, False)
    assert of(out, Close) == [Close(second, True)]
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")]


def test_destination_connect_result_after_reset_closes_new_socket() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    out = tunnel.receive([msg(T.STREAM_RESET, 7, "SSH")])
    assert of(out, Close) == [Close(key, True)]
    assert tunnel.connect_result(key, True) == [Close(key, False)]
    assert tunnel.connect_result(key, False) == []


def test_destination_new_stream_start_replaces_old_stream() -> None:
    tunnel = destination()
    old = of(
        tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.CONNECTION_START, 7, "SSH", 2)]), Connect
    )
    out = tunnel.receive([msg(T.STREAM_START, 8, "SSH", 1)])
    assert of(out, Close) == [Close(c.key, True) for c in old]
    assert StreamReset("SSH", 7, "replaced") in out
    assert len(of(out, Connect)) == 1 and sent(out) == []
    assert tunnel.receive([Message(type=T.DATA, stream_id=7, service_id="SSH", payload=b"stale")]) == []
    assert tunnel.active_stream("SSH") == 8


def test_destination_streams_of_services_are_independent() -> None:
    tunnel = destination({"SSH": SSH, "WEB": WEB}, ids=("SSH", "WEB"))
    out = tunnel.receive([msg(T.STREAM_START, 1, "SSH", 1), msg(T.STREAM_START, 2, "WEB", 1)])
    assert [c.target for c in of(out, Connect)] == [SSH, WEB]
    ssh, web = (c.key for c in of(out, Connect))
    out = tunnel.receive(
        [
            Message(type=T.DATA, stream_id=2, service_id="WEB", connection_id=1, payload=b"GET /"),
            Message(type=T.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"SSH-2.0"),
            Message(type=T.DATA, stream_id=1, service_id="WEB", connection_id=1, payload=b"stale"),
        ]
    )
    assert written(out) == {web: b"GET /", ssh: b"SSH-2.0"}


def test_destination_v3_local_close_sends_connection_reset_and_keeps_stream() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    tunnel.connect_result(key, True)
    out = tunnel.local_closed(key)
    assert sent(out) == [msg(T.CONNECTION_RESET, 7, "SSH", 1)]
    assert tunnel.active_stream("SSH") == 7
    assert len(of(tunnel.receive([msg(T.CONNECTION_START, 7, "SSH", 2)]), Connect)) == 1


def test_destination_v2_peer_stream_start_without_connection_id() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH")])  # no connection id: a V2 peer
    key = of(out, Connect)[0].key
    tunnel.connect_result(key, True)
    assert sent(tunnel.local_data(key, b"r")) == [
        Message(type=T.DATA, stream_id=7, service_id="SSH", payload=b"r")
    ]
    out = tunnel.receive([Message(type=T.DATA, stream_id=7, service_id="SSH", connection_id=3, payload=b"x")])
    assert written(out) == {key: b"x"}  # connection ids ignored with a V2 peer
    assert tunnel.receive([msg(T.CONNECTION_START, 7, "SSH", 2)]) == []
    out = tunnel.local_closed(key)
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")]
    assert tunnel.active_stream("SSH") is None


def test_destination_v1_peer_without_service_id() -> None:
    tunnel = destination({"": SSH}, ids=())
    out = tunnel.receive([msg(T.STREAM_START, 3)])
    key = of(out, Connect)[0].key
    assert of(out, Connect)[0].target == SSH
    tunnel.connect_result(key, True)
    assert sent(tunnel.local_data(key, b"r")) == [Message(type=T.DATA, stream_id=3, payload=b"r")]


def test_destination_v1_session() -> None:
    tunnel = TunnelState(Mode.DESTINATION, {"SSH": SSH})
    out = tunnel.session_started(V1)
    assert of(out, TunnelReady) == [TunnelReady(("",))] and not of(out, Listen)
    out = tunnel.receive([msg(T.STREAM_START, 3)])
    assert of(out, Connect)[0].target == SSH


def test_destination_tunnel_service_used_with_service_less_v1_peer() -> None:
    # The source runs with -y V1: no service id on the wire although the tunnel has one.
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 4)]), Connect)[0].key
    tunnel.connect_result(key, True)
    assert sent(tunnel.local_data(key, b"r")) == [Message(type=T.DATA, stream_id=4, payload=b"r")]


def test_destination_duplicate_connection_start_is_reset() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.CONNECTION_START, 7, "SSH", 2)])
    second = of(out, Connect)[1].key
    out = tunnel.receive([msg(T.CONNECTION_START, 7, "SSH", 2)])
    assert of(out, Close) == [Close(second, True)]
    assert sent(out) == [msg(T.CONNECTION_RESET, 7, "SSH", 2)]
    assert not of(out, Connect)


def test_destination_stale_connection_start_is_dropped() -> None:
    tunnel = destination()
    tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)])
    assert tunnel.receive([msg(T.CONNECTION_START, 6, "SSH", 2)]) == []


def test_destination_unknown_service_stream_start_is_ignored() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "NOPE", 1)])
    assert not of(out, Connect) and of(out, Log)[0].level == logging.WARNING


def test_destination_max_active_connections_resets() -> None:
    tunnel = destination(max_active_connections=2)
    out = tunnel.receive(
        [msg(T.STREAM_START, 7, "SSH", 1)] + [msg(T.CONNECTION_START, 7, "SSH", n) for n in (2, 3)]
    )
    assert len(of(out, Connect)) == 2
    assert sent(out) == [msg(T.CONNECTION_RESET, 7, "SSH", 3)]
    assert of(out, ConnectionRejected)


def test_destination_max_active_zero_resets_stream_start() -> None:
    tunnel = destination(max_active_connections=0)
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)])
    assert not of(out, Connect)
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")]
    assert tunnel.active_stream("SSH") is None


def test_destination_connection_reset_from_peer() -> None:
    tunnel = destination()
    out = tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.CONNECTION_START, 7, "SSH", 2)])
    first, second = (c.key for c in of(out, Connect))
    out = tunnel.receive([msg(T.CONNECTION_RESET, 7, "SSH", 1)])
    assert of(out, Close) == [Close(first, True)] and sent(out) == []
    out = tunnel.receive([msg(T.CONNECTION_RESET, 7, "SSH", 2)])
    assert of(out, Close) == [Close(second, True)] and sent(out) == []
    assert tunnel.active_stream("SSH") == 7  # the source decides when its stream ends


def test_destination_session_lost_then_new_session() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    assert tunnel.session_lost() == [Close(key, False)]
    tunnel.session_started(V3)
    tunnel.receive([service_ids("SSH")])
    assert len(of(tunnel.receive([msg(T.STREAM_START, 1, "SSH", 1)]), Connect)) == 1


# --- destination answers frames of a stream it does not have (one-sided resets) -------


def data(stream_id: int, service_id: str = "SSH", connection_id: int = 1, payload: bytes = b"x") -> Message:
    return Message(
        type=T.DATA, stream_id=stream_id, service_id=service_id, connection_id=connection_id, payload=payload
    )


def test_destination_answers_data_of_a_stream_reset_here_only_once() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    tunnel.connect_result(key, True)
    out = tunnel.receive([msg(T.STREAM_RESET, 7, "SSH")])  # the service told this side only
    assert of(out, Close) == [Close(key, True)] and sent(out) == []  # a reset is never answered
    out = tunnel.receive([data(7)])
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")] and not of(out, Write)
    assert of(out, Log)[0].level == logging.INFO
    # The rest of the stream's in-flight frames: no second answer.
    assert tunnel.receive([data(7), msg(T.CONNECTION_START, 7, "SSH", 2), data(7, connection_id=2)]) == []


def test_destination_answers_connection_start_of_a_dead_stream_with_stream_reset() -> None:
    # V3: STREAM_RESET (not CONNECTION_RESET) so that every connection of the dead stream
    # closes at the source, including idle ones that would never send DATA.
    tunnel = destination()
    tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.STREAM_RESET, 7, "SSH")])
    out = tunnel.receive([msg(T.CONNECTION_START, 7, "SSH", 3)])
    assert sent(out) == [msg(T.STREAM_RESET, 7, "SSH")] and not of(out, Connect)
    assert tunnel.active_stream("SSH") is None


def test_destination_answers_a_stream_whose_start_it_never_received() -> None:
    # The source started streams while this side was reconnecting: the service dropped the STREAM_STARTs.
    tunnel = destination()
    out = tunnel.receive([data(3), msg(T.CONNECTION_START, 3, "SSH", 2), msg(T.CONNECTION_START, 4, "SSH", 2)])
    assert sent(out) == [msg(T.STREAM_RESET, 3, "SSH"), msg(T.STREAM_RESET, 4, "SSH")]
    assert not of(out, Connect) and tunnel.active_stream("SSH") is None
    # A stream newer than the active one (its STREAM_START was lost) is answered too.
    tunnel.receive([msg(T.STREAM_START, 5, "SSH", 1)])
    assert sent(tunnel.receive([data(6)])) == [msg(T.STREAM_RESET, 6, "SSH")]
    assert tunnel.active_stream("SSH") == 5


def test_destination_stays_silent_for_streams_replaced_by_a_newer_stream_start() -> None:
    tunnel = destination()
    tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1), msg(T.STREAM_START, 8, "SSH", 1)])
    assert tunnel.receive([data(7), msg(T.CONNECTION_START, 7, "SSH", 2)]) == []  # PROTOCOL.md 4.4
    tunnel.receive([msg(T.STREAM_RESET, 8, "SSH")])  # no active stream now: 7 is still stale
    assert tunnel.receive([data(7)]) == []
    assert sent(tunnel.receive([data(8)])) == [msg(T.STREAM_RESET, 8, "SSH")]


def test_destination_does_not_answer_frames_of_a_stream_it_reset_itself() -> None:
    tunnel = destination()
    key = of(tunnel.receive([msg(T.STREAM_START, 7, "SSH", 1)]), Connect)[0].key
    assert sent(tunnel.connect_result(key, False)) == [msg(T.STREAM_RESET, 7, "SSH")]
    assert tunnel.receive([data(7), msg(T.CONNECTION_START, 7, "SSH", 2)]) == []  # in flight: already told


@pytest.mark.parametrize(
    "frame",
    [
        msg(T.STREAM_RESET, 9, "SSH"),
        msg(T.CONNECTION_RESET, 9, "SSH", 1),
        data(9, service_id="NOPE"),
        msg(T.CONNECTION_START, 9, "NOPE", 2),
    ],
)
def test_destination_never_answers_resets_nor_unknown_services(frame: Message) -> None:
    tunnel = destination()
    assert tunnel.receive([frame]) == []


def test_destination_answer_memory_is_bounded_and_per_session() -> None:
    tunnel = destination()
    assert sent(tunnel.receive([data(1)])) == [msg(T.STREAM_RESET, 1, "SSH")]
    assert tunnel.receive([data(1)]) == []
    from localproxy.tunnel.core import RESET_MEMORY

    # RESET_MEMORY newer answers push 1 out
    tunnel.receive([data(stream_id) for stream_id in range(2, RESET_MEMORY + 2)])
    assert sent(tunnel.receive([data(1)])) == [msg(T.STREAM_RESET, 1, "SSH")]
    assert tunnel.receive([data(65)]) == []
    # A new session: answers sent on the lost websocket may never have arrived.
    tunnel.session_lost()
    tunnel.session_started(V3)
    tunnel.receive([service_ids("SSH")])
    assert sent(tunnel.receive([data(65)])) == [msg(T.STREAM_RESET, 65, "SSH")]


def test_destination_answer_keeps_the_peers_wire_shape() -> None:
    v1 = destination({"": SSH}, ids=())  # a V1 peer: no service id on the wire
    assert sent(v1.receive([Message(type=T.DATA, stream_id=3, payload=b"x")])) == [msg(T.STREAM_RESET, 3)]
    v2 = destination()
    assert sent(v2.receive([Message(type=T.DATA, stream_id=3, service_id="SSH", payload=b"x")])) == [
        msg(T.STREAM_RESET, 3, "SSH")
    ]


@pytest.mark.parametrize("client_type", [None, "V2", "V1"])
def test_one_sided_reset_at_destination_closes_the_source_stream(client_type: str | None) -> None:
    """Wired together: the destination's answer ends the source's stream; the next connection gets a new one."""
    src = source({"SSH": SourcePort(5555)}, destination_client_type=client_type)
    dst = destination()
    first, out = src.local_opened("SSH")
    second, more = (None, []) if client_type else src.local_opened("SSH")  # V3: a second connection
    dst_out = dst.receive(sent(out + more))
    for connect in of(dst_out, Connect):
        dst.connect_result(connect.key, True)
    dst.receive([msg(T.STREAM_RESET, 1, "SSH" if client_type != "V1" else "")])  # to the destination only
    answer = dst.receive(sent(src.local_data(first, b"lost")))
    out = src.receive(sent(answer))
    closed = {first} if second is None else {first, second}
    assert {c.key for c in of(out, Close)} == closed and sent(out) == []
    assert src.active_stream("SSH") is None
    key, out = src.local_opened("SSH")
    assert [m.type for m in sent(out)] == [T.STREAM_START] and sent(out)[0].stream_id == 2
    assert len(of(dst.receive(sent(out)), Connect)) == 1
    # A late answer for the old stream changes nothing at the source.
    assert src.receive([msg(T.STREAM_RESET, 1, "SSH" if client_type != "V1" else "")]) == []
    assert src.active_stream("SSH") == 2


# --- source and destination wired together (a loss-free in-memory service) ----------


class Pair:
    """A source and a destination TunnelState whose Send frames reach each other."""

    def __init__(self, client_type: str | None = None, max_payload: int = 64512) -> None:
        ids = ("A",) if client_type == "V1" else ("A", "B")
        self.src = source({}, ids=ids, destination_client_type=client_type, max_payload_size=max_payload)
        self.dst = destination({"A": SSH, "B": WEB}, ids=("A", "B"), max_payload_size=max_payload)
        if client_type == "V1":
            self.dst = destination({"A": SSH}, ids=ids, max_payload_size=max_payload)
        self.received: dict[tuple[str, int], bytes] = {}  # (side, key) -> bytes written locally
        self.open: dict[str, set[int]] = {"src": set(), "dst": set()}
        self.closed: dict[str, set[int]] = {"src": set(), "dst": set()}
        self.peer_key: dict[int, int] = {}  # destination key -> source key
        self.held: set[int] = set()

    def run(self, side: str, actions: list[Any]) -> None:
        pending = [(side, actions)]
        for _ in range(10000):
            if not pending:
                return
            side, actions = pending.pop(0)
            other = "dst" if side == "src" else "src"
            frames = b"".join(bytes(p) for a in actions if isinstance(a, SENDS) for p in a.parts)
            for action in actions:
                if isinstance(action, Write):
                    assert action.key in self.open[side], (side, action)
                    self.received[(side, action.key)] = self.received.get((side, action.key), b"") + bytes(
                        action.data
                    )
                elif isinstance(action, Close):
                    self.open[side].discard(action.key)
                    self.closed[side].add(action.key)
                elif isinstance(action, Connect):
                    self.open["dst"].add(action.key)
                    ids = self.dst.connection_ids(action.key)
                    (src_key,) = [k for k in self.open["src"] if self.src.connection_ids(k) == ids]
                    self.peer_key[action.key] = src_key
                    pending.append(("dst", self.dst.connect_result(action.key, True)))
                elif isinstance(action, Release):
                    self.held.discard(action.key)
                elif isinstance(action, Hold):
                    self.held.add(action.key)
                assert not isinstance(action, (Fatal, RestartSession)), action
            if frames:
                target = self.dst if other == "dst" else self.src
                pending.append((other, target.receive(FrameDecoder().feed(frames))))
        raise AssertionError("action loop did not settle")


@settings(max_examples=150, deadline=None)
@given(
    client_type=st.sampled_from([None, "V2", "V1"]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["open", "send", "close", "dst-send", "dst-close"]),
            st.integers(0, 7),
            st.binary(max_size=300),
        ),
        max_size=40,
    ),
)
@example(client_type="V2", ops=[("open", 0, b""), ("open", 0, b""), ("send", 1, b"held"), ("close", 0, b"")])
@example(
    client_type=None,
    ops=[("open", 0, b""), ("open", 0, b""), ("dst-send", 1, b"x" * 200), ("dst-close", 0, b"")],
)
def test_random_operations_keep_bytes_in_order_and_states_consistent(
    client_type: str | None, ops: list
) -> None:
    pair = Pair(client_type, max_payload=64)
    services = ["A"] if client_type == "V1" else ["A", "B"]
    src_keys: list[int] = []
    expected_at_dst: dict[int, bytes] = {}  # source key -> bytes sent by the source app
    expected_at_src: dict[int, bytes] = {}  # destination key -> bytes sent by the destination app
    for op, index, data in ops:
        if op == "open":
            key, out = pair.src.local_opened(services[index % len(services)])
            pair.open["src"].add(key)
            src_keys.append(key)
            expected_at_dst[key] = b""
            pair.run("src", out)
        elif not src_keys:
            continue
        elif op == "send":
            key = src_keys[index % len(src_keys)]
            if key in pair.open["src"]:
                expected_at_dst[key] += data
                pair.run("src", pair.src.local_data(key, data))
        elif op == "close":
            key = src_keys[index % len(src_keys)]
            if key in pair.open["src"]:
                pair.open["src"].discard(key)
                pair.run("src", pair.src.local_closed(key))
        else:
            live = sorted(pair.open["dst"])
            if not live:
                continue
            key = live[index % len(live)]
            if op == "dst-send":
                expected_at_src[key] = expected_at_src.get(key, b"") + data
                pair.run("dst", pair.dst.local_data(key, data))
            else:
                pair.open["dst"].discard(key)
                pair.run("dst", pair.dst.local_closed(key))
        # Invariants: every live, non-held source connection has exactly one live peer.
        live_src = {k for k in pair.open["src"] if k not in pair.held}
        assert pair.src.connection_count() >= len(live_src)
        assert pair.dst.connection_count() == len(pair.open["dst"])
        assert len(live_src) == len(pair.open["dst"])
        assert not pair.held & set(k for k in pair.open["src"] if pair.src.connection_ids(k))
    # Bytes: in this loss-free model every connection pair gets exactly what the other
    # side's application sent, in order (data read while held included).
    for dst_key, src_key in pair.peer_key.items():
        assert pair.received.get(("dst", dst_key), b"") == expected_at_dst[src_key]
        assert pair.received.get(("src", src_key), b"") == expected_at_src.get(dst_key, b"")
    assert len(pair.peer_key) == len(set(pair.peer_key.values()))
