"""The send scheduler, pacer and receive gate without sockets or an event loop."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localproxy.tunnel.actions import DataFramer, control_frame
from localproxy.tunnel.pacing import Pacer
from localproxy.tunnel.receive_policy import ReceiveGate
from localproxy.tunnel.scheduler import MIN_CHUNK, MIN_TAIL, SendScheduler
from localproxy.wire.codec import FrameDecoder, Message, MessageType

T = MessageType
MAX_PAYLOAD = 64512


def framer(key: int, stream: int = 1, service: str = "SSH") -> DataFramer:
    return DataFramer(stream, service, key, MAX_PAYLOAD)


def drain(scheduler: SendScheduler, budget: int = 131076, limit: int = 10_000) -> list[list[Message]]:
    """Every message until the scheduler is empty, decoded."""
    messages = []
    for _ in range(limit):
        if not scheduler:
            return messages
        parts = scheduler.take_message(budget)
        assert parts, "a non-empty scheduler gave an empty message"
        messages.append(FrameDecoder().feed(b"".join(bytes(p) for p in parts)))
    raise AssertionError("did not drain")


def flat(messages: list[list[Message]]) -> list[Message]:
    return [frame for message in messages for frame in message]


def payloads(frames: list[Message], connection_id: int) -> bytes:
    return b"".join(f.payload for f in frames if f.type == T.DATA and f.connection_id == connection_id)


# --- order --------------------------------------------------------------------------------


def test_connection_reset_follows_that_connections_data() -> None:
    scheduler = SendScheduler()
    scheduler.push_data(1, "SSH", framer(1), b"a" * 100_000)
    scheduler.push_control(control_frame(T.CONNECTION_RESET, 1, "SSH", 1), 1, "SSH")
    frames = flat(drain(scheduler, 8192))
    assert payloads(frames, 1) == b"a" * 100_000
    assert frames[-1].type == T.CONNECTION_RESET


def test_stream_barriers_order_a_service_and_leave_others_free() -> None:
    scheduler = SendScheduler()
    scheduler.push_control(control_frame(T.STREAM_START, 1, "SSH", 1), service_id="SSH")
    scheduler.push_data(1, "SSH", framer(1), b"x" * 50_000)
    scheduler.push_data(9, "WEB", framer(9, 7, "WEB"), b"w" * 20_000)
    scheduler.push_control(control_frame(T.STREAM_RESET, 1, "SSH"), service_id="SSH")
    scheduler.push_control(control_frame(T.STREAM_START, 2, "SSH", 1), service_id="SSH")
    scheduler.push_data(2, "SSH", framer(1, 2), b"y" * 10)
    frames = flat(drain(scheduler, 4096))
    ssh = [(f.type, f.stream_id) for f in frames if f.service_id == "SSH"]
    first_data = ssh.index((T.DATA, 1))
    assert ssh[0] == (T.STREAM_START, 1) and first_data == 1
    reset = ssh.index((T.STREAM_RESET, 1))
    assert all(kind == T.DATA and stream == 1 for kind, stream in ssh[1:reset])
    assert ssh[reset + 1 :] == [(T.STREAM_START, 2), (T.DATA, 2)]
    # WEB was not held back behind SSH's barriers: it is interleaved before SSH's reset.
    positions = [i for i, f in enumerate(frames) if f.service_id == "WEB"]
    assert positions[0] < frames.index(next(f for f in frames if f.type == T.STREAM_RESET))


def test_connection_start_waits_for_its_stream_start() -> None:
    scheduler = SendScheduler()
    scheduler.push_data(5, "WEB", framer(5, 3, "WEB"), b"z" * 200_000)  # something to be busy with
    scheduler.push_control(control_frame(T.STREAM_START, 4, "SSH", 1), service_id="SSH")
    scheduler.push_control(control_frame(T.CONNECTION_START, 4, "SSH", 2), 2, "SSH")
    scheduler.push_data(2, "SSH", framer(2, 4), b"q")
    frames = [f for f in flat(drain(scheduler, 4096)) if f.service_id == "SSH"]
    assert [f.type for f in frames] == [T.STREAM_START, T.CONNECTION_START, T.DATA]


def test_unordered_control_goes_first() -> None:
    scheduler = SendScheduler()
    scheduler.push_data(1, "SSH", framer(1), b"a" * 300_000)
    scheduler.take_message(4096)
    scheduler.push_control(control_frame(T.STREAM_RESET, 99, "SSH"))
    assert FrameDecoder().feed(b"".join(bytes(p) for p in scheduler.take_message(4096)))[0].stream_id == 99


# --- fairness and latency ---------------------------------------------------------------------


def test_bulk_flows_get_equal_byte_shares() -> None:
    scheduler = SendScheduler(flow_high=1 << 30, total_high=1 << 30)
    for key in (1, 2, 3, 4):
        scheduler.push_data(key, "SSH", framer(key), bytes(4 << 20))
    sent = {key: 0 for key in (1, 2, 3, 4)}
    for _ in range(100):
        for frame in FrameDecoder().feed(b"".join(bytes(p) for p in scheduler.take_message(16384))):
            sent[frame.connection_id] += len(frame.payload)
    mean = sum(sent.values()) / 4
    assert all(abs(share - mean) <= 0.1 * mean for share in sent.values()), sent


def test_bulk_messages_hold_whole_max_size_frames_without_tiny_tails() -> None:
    scheduler = SendScheduler()
    scheduler.push_data(1, "SSH", framer(1), bytes(1 << 20))
    for _ in range(4):
        frames = FrameDecoder().feed(b"".join(bytes(p) for p in scheduler.take_message(131076)))
        assert [len(f.payload) for f in frames] == [MAX_PAYLOAD, MAX_PAYLOAD]
    assert MIN_TAIL > 131076 - 2 * (MAX_PAYLOAD + framer(1).overhead)


def test_a_sparse_flow_goes_in_the_next_message() -> None:
    scheduler = SendScheduler()
    scheduler.push_data(1, "BULK", framer(1, 1, "BULK"), bytes(1 << 20))
    for _ in range(5):  # the bulk connection's first quantum is spent: it is backlogged now
        scheduler.take_message(4096)
    scheduler.push_data(2, "SSH", framer(2, 2), b"k")  # a keystroke behind 1 MiB of bulk
    frames = FrameDecoder().feed(b"".join(bytes(p) for p in scheduler.take_message(4096)))
    assert frames[0].connection_id == 2 and frames[0].payload == b"k"


@pytest.mark.parametrize("budget", [4096, 16384, 131076])
def test_messages_stay_within_the_budget(budget: int) -> None:
    scheduler = SendScheduler()
    for key in range(1, 6):
        scheduler.push_data(key, "SSH", framer(key), bytes(300_000 + key))
        scheduler.push_control(control_frame(T.CONNECTION_RESET, 1, "SSH", key), key, "SSH")
    for _ in range(10_000):
        if not scheduler:
            break
        size = sum(len(p) for p in scheduler.take_message(budget))
        assert size <= max(budget, MIN_CHUNK + 64)
    assert not scheduler and scheduler.queued == 0 and scheduler.flows == 0


# --- backpressure ------------------------------------------------------------------------


def test_a_full_flow_is_paused_alone_and_resumed_when_drained() -> None:
    scheduler = SendScheduler(flow_high=64 * 1024, flow_low=16 * 1024, total_high=1 << 20)
    assert not scheduler.push_data(1, "SSH", framer(1), bytes(60 * 1024))
    assert scheduler.push_data(1, "SSH", framer(1), bytes(10 * 1024))  # over its mark
    assert not scheduler.push_data(2, "SSH", framer(2), b"interactive")  # others go on
    resumed: list[int] = []
    for _ in range(100):
        scheduler.take_message(8192)
        resumed += scheduler.take_resumed()
        if resumed:
            break
    assert resumed == [1] and scheduler.queued_for(1) <= 16 * 1024


def test_over_the_total_every_flow_with_bytes_queued_pauses() -> None:
    scheduler = SendScheduler(flow_high=1 << 20, flow_low=1 << 18, total_high=100_000)
    assert not scheduler.push_data(1, "SSH", framer(1), bytes(90_000))
    assert scheduler.push_data(2, "SSH", framer(2), bytes(20_000))
    assert scheduler.push_data(1, "SSH", framer(1), b"more")
    drain(scheduler, 16384)
    assert sorted(scheduler.take_resumed()) == [1, 2]


# --- property: nothing lost, nothing reordered --------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.integers(1, 4), st.integers(1, 70_000)),
        st.tuples(st.just("reset"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("barrier"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("take"), st.integers(0, 0), st.sampled_from([4096, 9000, 131076])),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_any_interleaving_keeps_each_connections_bytes_and_order(ops: list[tuple[str, int, int]]) -> None:
    """Per connection: its bytes and reset, and its service's stream barriers, in push order."""
    scheduler = SendScheduler(flow_high=100_000, flow_low=20_000, total_high=300_000)
    pushed: list[tuple[str, Any]] = []  # (service, event) in push order; event = (key, item) or barrier id
    out: list[Message] = []
    for index, (kind, key, value) in enumerate(ops):
        service = f"S{key % 2}"
        if kind == "data":
            chunk = bytes([index % 251]) * value
            scheduler.push_data(key, service, framer(key, 1, service), chunk)
            pushed.append((service, (key, chunk)))
        elif kind == "reset":
            scheduler.push_control(control_frame(T.CONNECTION_RESET, 1, service, key), key, service)
            pushed.append((service, (key, "reset")))
        elif kind == "barrier":
            scheduler.push_control(control_frame(T.STREAM_RESET, index + 1, service), service_id=service)
            pushed.append((service, ("barrier", index + 1)))
        else:
            out += FrameDecoder().feed(b"".join(bytes(p) for p in scheduler.take_message(value)))
    out += flat(drain(scheduler, 131076))
    seen: list[tuple[str, Any]] = []
    for frame in out:
        if frame.type == T.DATA:
            seen.append((frame.service_id, (frame.connection_id, bytes(frame.payload))))
        elif frame.type == T.CONNECTION_RESET:
            seen.append((frame.service_id, (frame.connection_id, "reset")))
        else:
            seen.append((frame.service_id, ("barrier", frame.stream_id)))
    for key in {event[0] for _, event in pushed if event[0] != "barrier"}:
        service = f"S{key % 2}"

        def view(events: list[tuple[str, Any]]) -> list[Any]:
            return _joined([e if e[0] == "barrier" else e[1] for s, e in events if s == service and e[0] in (key, "barrier")])

        assert view(seen) == view(pushed), key
    assert scheduler.queued == 0 and scheduler.flows == 0


def _joined(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += item
        else:
            out.append(item)
    return out


# --- pacer ------------------------------------------------------------------------------


def test_pacer_sizes_the_budget_from_the_drain_rate() -> None:
    pacer = Pacer(target_delay=0.004, minimum=4096, maximum=131076, start=32768)
    assert pacer.budget == 32768 and pacer.slow
    now = 0.0
    for _ in range(50):  # 800 kB/s: 8 KB every 10 ms
        pacer.sending(now)
        now += 0.01
        pacer.sent(8000, now)
    assert pacer.rate == pytest.approx(800_000, rel=0.05)
    assert pacer.budget == 4096  # 800 kB/s * 4 ms = 3.2 KB, at least the minimum
    for _ in range(200):  # then a fast link: 131076 bytes per 0.2 ms, for 40 ms
        pacer.sending(now)
        now += 0.0002
        pacer.sent(131076, now)
    assert pacer.budget == 131076


def test_pacer_grows_only_after_bursts_that_drained_fast() -> None:
    pacer = Pacer(target_delay=0.004, minimum=4096, maximum=131076, start=32768)
    now = 0.0
    for _ in range(10):  # small messages now and then (a handshake, keystrokes): no evidence
        pacer.sending(now)
        now += 0.0001
        pacer.sent(100, now)
        assert not pacer.idle()
        now += 1.0
    assert pacer.rate is None and pacer.budget == 32768
    for _ in range(4):  # 256 KiB drained in 0.2 ms, then dry: a fast link
        pacer.sending(now)
        for _ in range(8):
            now += 0.000025
            pacer.sent(32768, now)
        pacer.idle()
        now += 0.01
    assert pacer.budget == 131076
    slow = Pacer(target_delay=0.004, minimum=4096, maximum=131076, start=32768)
    slow.sending(now)
    for _ in range(2):  # 64 KiB in 15 ms (4 MB/s < 32 KiB / 4 ms): not faster than the budget
        now += 0.0075
        slow.sent(32768, now)
    assert not slow.idle() and slow.budget == 32768


# --- receive gate ------------------------------------------------------------------------


def test_gate_reads_until_the_budget_then_resumes_below_three_quarters() -> None:
    gate = ReceiveGate(budget=4_000_000, stall_timeout=10)
    assert gate.update({7: 2_000_000}, 0.0).read
    assert not gate.update({7: 4_100_000}, 1.0).read
    assert not gate.update({7: 3_500_000}, 2.0).read
    assert gate.update({7: 2_900_000}, 3.0).read


def test_gate_resets_the_largest_backlog_after_the_timeout_and_only_then() -> None:
    gate = ReceiveGate(budget=1_000_000, stall_timeout=10)
    assert not gate.update({1: 900_000, 2: 300_000}, 100.0).read
    decision = gate.update({1: 900_000, 2: 300_000}, 109.9)
    assert decision.reset is None and not decision.read
    decision = gate.update({1: 900_000, 2: 300_000}, 110.0)
    assert decision.reset == 1 and decision.stalled_for == pytest.approx(10.0)
    assert gate.update({2: 300_000}, 110.0).read


def test_gate_with_no_timeout_never_resets() -> None:
    gate = ReceiveGate(budget=1000, stall_timeout=0)
    gate.update({1: 5000}, 0.0)
    assert gate.update({1: 5000}, 1e6).reset is None
