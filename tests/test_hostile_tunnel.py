"""Issue 22 in the sans-I/O core (no sockets): answers to a flooding peer are per stream and bounded."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from localproxy.settings import V3
from localproxy.tunnel.actions import Listen, Log, Send
from localproxy.tunnel.core import RESET_MEMORY
from localproxy.tunnel.scheduler import SendScheduler
from localproxy.tunnel.state import TunnelState
from localproxy.types import DestinationTarget, Mode, SourcePort
from localproxy.wire.codec import FrameDecoder, Message, MessageType

T = MessageType
SSH = DestinationTarget("127.0.0.1", 22)


def of(actions: Iterable[Any], kind: type) -> list[Any]:
    return [action for action in actions if isinstance(action, kind)]


def sent_types(actions: Iterable[Any]) -> list[int]:
    return [FrameDecoder().feed(action.frame)[0].type for action in of(actions, Send)]


def tunnel_of(mode: Mode, services: dict[str, Any], ids: tuple[str, ...], **kw: Any) -> tuple[TunnelState, list[Any]]:
    tunnel = TunnelState(mode, services, **kw)
    tunnel.session_started(V3)
    return tunnel, tunnel.receive([Message(T.SERVICE_IDS, available_service_ids=ids)])


def data(stream_id: int) -> Message:
    return Message(T.DATA, stream_id, payload=b"x", service_id="SSH", connection_id=1)


def test_data_flood_for_one_unknown_stream_draws_one_reset_and_one_keyed_log() -> None:
    tunnel, _ = tunnel_of(Mode.DESTINATION, {"SSH": SSH}, ("SSH",))
    out = tunnel.receive([data(7)] * 10_000)
    assert sent_types(out) == [T.STREAM_RESET]
    (log,) = of(out, Log)
    assert log.key == "dead-stream-reset" and "stream 7" in log.message


def test_answers_are_remembered_for_reset_memory_ids() -> None:
    tunnel, _ = tunnel_of(Mode.DESTINATION, {"SSH": SSH}, ("SSH",))
    out = tunnel.receive([data(s) for s in range(1, RESET_MEMORY + 1)] * 3)
    assert len(of(out, Send)) == RESET_MEMORY  # each id once, the repeats silent
    assert len({log.key for log in of(out, Log)}) == 1  # one kind: one rate-limit budget


def test_connection_start_over_the_limit_logs_one_kind() -> None:
    tunnel, _ = tunnel_of(Mode.DESTINATION, {"SSH": SSH}, ("SSH",), max_active_connections=2)
    tunnel.receive([Message(T.STREAM_START, 1, service_id="SSH", connection_id=1)])
    starts = [Message(T.CONNECTION_START, 1, service_id="SSH", connection_id=c) for c in range(2, 1002)]
    out = tunnel.receive(starts)
    assert tunnel.connection_count("SSH") == 2
    assert sent_types(out) == [T.CONNECTION_RESET] * 999
    assert {log.key for log in of(out, Log)} == {"connection-limit"}


def test_source_listens_for_configured_services_and_says_the_rest_once() -> None:
    ids = ("SSH", *(f"S{i}" for i in range(1999)))
    tunnel, out = tunnel_of(Mode.SOURCE, {"SSH": SourcePort(0)}, ids)
    assert of(out, Listen) == [Listen("SSH", 0)]
    (log,) = of(out, Log)
    assert log.level == logging.INFO and log.key == "ignored-services"
    assert log.message.endswith("no listener for them: S0, S1, S2, S3, S4 and 1,994 more")
    again = tunnel.receive([Message(T.SERVICE_IDS, available_service_ids=ids)])
    assert of(again, Log) == [] and of(again, Listen) == []  # the same announcement: said once


def test_source_without_mapping_takes_three_services_at_most() -> None:
    ids = tuple(f"S{i}" for i in range(2000))
    _, out = tunnel_of(Mode.SOURCE, {}, ids)
    assert of(out, Listen) == [Listen("S0", 0), Listen("S1", 0), Listen("S2", 0)]
    (log,) = of(out, Log)
    assert log.level == logging.WARNING and "1,997 service(s) beyond the 3" in log.message


def test_unknown_service_id_is_logged_as_sent_for_the_formatter_to_escape() -> None:
    tunnel, _ = tunnel_of(Mode.DESTINATION, {"SSH": SSH}, ("SSH",))
    out = tunnel.receive([Message(T.STREAM_START, 1, service_id="X\nY")] * 100)
    assert [log.key for log in of(out, Log)] == ["start-unknown-service"] * 100  # one kind: limited


def test_scheduler_counts_queued_control_bytes() -> None:
    scheduler = SendScheduler()
    frames = [bytes(12)] * 3
    scheduler.push_control(frames[0])  # tied to nothing
    scheduler.push_control(frames[1], service_id="SSH")  # a stream barrier
    scheduler.push_control(frames[2], key=5, service_id="SSH")  # a connection's
    assert scheduler.control_queued == 36
    for _ in range(5):
        if not scheduler:
            break
        scheduler.take_message(16)
    assert scheduler.control_queued == 0 and scheduler.queued == 0
