"""Tests of localproxy.wire.codec: error paths, stream splitting, and differential
property tests against google.protobuf's generated ``Message_pb2.Message``."""

from __future__ import annotations

import itertools
import re

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.errors import ProtocolError
from localproxy.wire._pb.Message_pb2 import Message as PbMessage
from localproxy.wire.codec import (
    MAX_FRAME_SIZE,
    MAX_PAYLOAD_SIZE,
    FrameDecoder,
    Message,
    MessageType,
    encode_data_frame,
    encode_data_frames,
    encode_frame,
)

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def decode_one(data: bytes, **limits: int) -> Message:
    messages = FrameDecoder(**limits).feed(data)
    assert len(messages) == 1
    return messages[0]


def pb_values(pb: PbMessage) -> tuple[object, ...]:
    return (pb.type, pb.streamId, pb.ignorable, pb.payload, pb.serviceId, tuple(pb.availableServiceIds), pb.connectionId)


def our_values(m: Message) -> tuple[object, ...]:
    payload = bytes(m.payload)
    return (int(m.type), m.stream_id, m.ignorable, payload, m.service_id, m.available_service_ids, m.connection_id)


def to_pb(message: Message) -> PbMessage:
    return PbMessage(
        type=int(message.type),
        streamId=message.stream_id,
        ignorable=message.ignorable,
        payload=bytes(message.payload),
        serviceId=message.service_id,
        availableServiceIds=message.available_service_ids,
        connectionId=message.connection_id,
    )


SAMPLES = [
    Message(type=MessageType.DATA, stream_id=1, payload=b"x"),
    Message(type=MessageType.DATA, stream_id=300, payload=b"\0" * 5000, connection_id=7),
    Message(type=MessageType.DATA, stream_id=5, payload=b"ab", service_id="SSH", connection_id=2),
    Message(type=MessageType.STREAM_START, stream_id=2, service_id="SSH", connection_id=1),
    Message(type=MessageType.SERVICE_IDS, available_service_ids=("SSH", "", "WEB\u00e9")),
    Message(type=MessageType.SESSION_RESET),
    Message(type=42, stream_id=-3, ignorable=True),
]


# --- Message and encoding ------------------------------------------------------


def test_message_defaults_and_value_equality() -> None:
    message = Message(type=MessageType.DATA, stream_id=1, payload=b"x")
    assert (message.ignorable, message.service_id, message.available_service_ids, message.connection_id) == (
        (False, "", (), 0)
    )
    assert message == Message(type=1, stream_id=1, payload=memoryview(b"x"), has_unknown_fields=True)
    assert message != Message(type=1, stream_id=1, payload=b"y")
    assert Message(available_service_ids=["a"]).available_service_ids == ("a",)
    assert "stream_id=1" in repr(message) and "DATA" in repr(message)
    with pytest.raises(AttributeError):
        message.not_a_field = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("message", SAMPLES, ids=repr)
def test_encode_frame_is_byte_identical_to_protobuf(message: Message) -> None:
    body = to_pb(message).SerializeToString()
    assert encode_frame(message) == frame(body)
    assert decode_one(encode_frame(message)) == message


def test_negative_int32_encodes_as_ten_byte_varint() -> None:
    data = encode_frame(Message(type=MessageType.DATA, stream_id=-1))
    assert data == frame(b"\x08\x01\x10" + b"\xff" * 9 + b"\x01")
    assert decode_one(data).stream_id == -1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Message(type=1, stream_id=1, payload=b"\0" * (MAX_PAYLOAD_SIZE + 1)), "payload of 64513 bytes exceeds"),
        (Message(type=5, available_service_ids=["s" * 200] * 400), "exceeds the 65535-byte frame limit"),
        (Message(type=1, stream_id=2**31), "stream_id 2147483648 is out of the int32 range"),
        (Message(type=1, stream_id=1, connection_id=-1), "connection_id -1 is out of the uint32 range"),
        (Message(type=2**40), "type .* out of the int32 range"),
    ],
)
def test_encode_frame_rejects(message: Message, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        encode_frame(message)


@pytest.mark.parametrize("payload_size", [0, 1, 127, 128, 16383, 16384, MAX_PAYLOAD_SIZE])
@pytest.mark.parametrize(
    ("stream_id", "connection_id", "service_id"),
    [(1, 0, ""), (1, 1, "SSH"), (200, 70000, "\u00e9" * 100), (2**31 - 1, 2**32 - 1, "")],
)
def test_encode_data_frame(payload_size: int, stream_id: int, connection_id: int, service_id: str) -> None:
    payload = bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    header, same_payload = encode_data_frame(stream_id, connection_id, payload, service_id)
    assert same_payload is payload  # no copy
    joined = header + same_payload
    expected = Message(MessageType.DATA, stream_id, payload=payload, service_id=service_id, connection_id=connection_id)
    assert decode_one(joined) == expected
    assert pb_values(PbMessage.FromString(joined[2:])) == our_values(expected)
    if connection_id == 0 and not service_id:
        assert joined == encode_frame(expected)


def test_encode_data_frame_rejects_oversized_payload_and_bad_ids() -> None:
    with pytest.raises(ProtocolError, match="payload of 64513 bytes exceeds the 64512-byte limit"):
        encode_data_frame(1, 1, bytes(MAX_PAYLOAD_SIZE + 1))
    with pytest.raises(ProtocolError, match="stream_id"):
        encode_data_frame(2**31, 1, b"x")
    with pytest.raises(ProtocolError, match="connection_id"):
        encode_data_frame(1, 2**32, b"x")
    with pytest.raises(ProtocolError, match="exceeds the 65535-byte frame limit"):
        encode_data_frame(1, 1, bytes(MAX_PAYLOAD_SIZE), "s" * 1100)
    with pytest.raises(ProtocolError, match="exceeds the 65535-byte frame limit"):
        encode_frame(Message(MessageType.DATA, 1, payload=bytes(MAX_PAYLOAD_SIZE), service_id="s" * 1100))


def test_encode_data_frames_splits_without_copying() -> None:
    data = bytes(range(256)) * 1000  # 256000 bytes -> 3 full frames + 1 partial
    parts = encode_data_frames(3, 2, data, service_id="WEB")
    assert len(parts) == 8 and all(isinstance(chunk, memoryview) for chunk in parts[1::2])
    messages = FrameDecoder().feed(b"".join(parts))
    assert [len(m.payload) for m in messages] == [MAX_PAYLOAD_SIZE] * 3 + [256000 - 3 * MAX_PAYLOAD_SIZE]
    assert b"".join(bytes(m.payload) for m in messages) == data
    assert {(m.stream_id, m.connection_id, m.service_id) for m in messages} == {(3, 2, "WEB")}
    assert encode_data_frames(3, 2, b"") == []
    assert len(encode_data_frames(3, 2, b"abcdefg", max_payload=3)) == 6
    with pytest.raises(ProtocolError, match="max_payload must be within"):
        encode_data_frames(3, 2, b"abc", max_payload=0)


# --- decoding: stream handling -------------------------------------------------


def test_many_frames_in_one_feed_and_split_at_every_offset() -> None:
    stream = b"".join(encode_frame(m) for m in SAMPLES)
    assert FrameDecoder().feed(stream) == SAMPLES
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        first = decoder.feed(stream[:cut])
        assert first + decoder.feed(stream[cut:]) == SAMPLES, cut
        assert decoder.pending == 0


def test_byte_by_byte_and_pending_count() -> None:
    data = encode_frame(SAMPLES[3]) * 2
    decoder = FrameDecoder()
    received: list[Message] = []
    for index in range(len(data)):
        received += decoder.feed(data[index : index + 1])
        assert decoder.pending == (index + 1) % (len(data) // 2)
    assert received == [SAMPLES[3]] * 2


def test_three_way_splits() -> None:
    expected = [SAMPLES[0], SAMPLES[2], SAMPLES[3], SAMPLES[4]]
    stream = b"".join(encode_frame(m) for m in expected)
    for cut1 in range(len(stream) + 1):
        for cut2 in range(cut1, len(stream) + 1, 3):
            decoder = FrameDecoder()
            parts = (stream[:cut1], stream[cut1:cut2], stream[cut2:])
            assert [m for part in parts for m in decoder.feed(part)] == expected


def test_mutable_input_is_copied_so_payloads_stay_stable() -> None:
    buffer = bytearray(encode_frame(SAMPLES[0]))
    message = FrameDecoder().feed(memoryview(buffer))[0]
    buffer[-1] = ord("z")
    assert message.payload == b"x"


def test_payload_is_a_zero_copy_view() -> None:
    data = encode_frame(SAMPLES[1]) * 2
    messages = FrameDecoder().feed(data)
    assert all(isinstance(m.payload, memoryview) and m.payload.obj is data for m in messages)


# --- decoding: values ----------------------------------------------------------


def test_unknown_type_is_kept_as_int_and_unknown_fields_are_flagged() -> None:
    message = decode_one(frame(b"\x08\x2a\x18\x01" + b"\x40\x05" + b"\x49" + bytes(8) + b"\x55" + bytes(4)))
    assert message.type == 42 and not isinstance(message.type, MessageType) and message.ignorable
    assert message.has_unknown_fields
    assert not decode_one(encode_frame(SAMPLES[0])).has_unknown_fields


def test_groups_and_big_field_numbers_are_skipped() -> None:
    group = b"\x43" + b"\x48\x01" + b"\x4b\x50\x02\x4c" + b"\x44"  # field 8 group with a nested group
    big_tag = b"\xf8\xff\xff\xff\x0f\x01"  # field 2**29 - 1, varint
    message = decode_one(frame(b"\x08\x01" + group + big_tag + b"\x10\x05"))
    assert (message.type, message.stream_id, message.has_unknown_fields) == (MessageType.DATA, 5, True)


def test_int32_and_uint32_keep_the_low_32_bits_like_protobuf() -> None:
    wide = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # 2**64 - 1
    body = b"\x08\x01\x10" + b"\x81\x80\x80\x80\x10" + b"\x38" + wide  # streamId 2**32 + 1
    message = decode_one(frame(body))
    assert (message.stream_id, message.connection_id) == (1, 2**32 - 1)
    assert pb_values(PbMessage.FromString(body)) == our_values(message)


def test_last_scalar_wins_and_repeated_strings_accumulate() -> None:
    body = b"\x10\x01\x08\x02\x2a\x01a\x32\x01x\x08\x01\x10\x09\x2a\x01b\x32\x00\x22\x01p\x22\x01q"
    message = decode_one(frame(body))
    assert our_values(message) == (1, 9, False, b"q", "b", ("x", ""), 0)
    assert pb_values(PbMessage.FromString(body)) == our_values(message)


def test_near_miss_data_layouts_take_the_general_parser() -> None:
    """Byte patterns that look like the DATA fast path but are not."""
    trailer_is_ignorable = b"\x08\x01\x10\x01\x22\x01x\x18\x01"  # 18 01 where 38 cid would be
    two_byte_connection_id = b"".join(encode_data_frame(1, 4357, bytes(33)))  # cid varint 85 22
    wide_stream_id = encode_frame(Message(type=MessageType.DATA, stream_id=128, payload=b"x", connection_id=1))
    stream_id_varint_85_22 = encode_frame(Message(type=MessageType.DATA, stream_id=4357, payload=bytes(33)))
    three_byte_stream_id = encode_frame(Message(MessageType.DATA, 20000, payload=b"x", service_id="S"))
    fields_on_both_sides = frame(b"\x08\x01\x10\x01\x38\x02\x22\x01x\x2a\x01S\x38\x03")
    long_service_id = b"".join(encode_data_frame(1, 1, b"x", "s" * 128))
    service_id_then_unknown = frame(b"\x08\x01\x10\x01\x2a\x01S\x40\x01\x22\x01x")
    service_id_before_connection_id_after = frame(b"\x08\x01\x10\x01\x2a\x01S\x22\x01x\x38\x03")
    overlong_payload_length = frame(b"\x08\x01\x10\x01\x22\x80\x80\x80\x00")  # a 4-byte varint 0
    for data in (
        frame(trailer_is_ignorable),
        two_byte_connection_id,
        wide_stream_id,
        stream_id_varint_85_22,
        three_byte_stream_id,
        fields_on_both_sides,
        long_service_id,
        service_id_then_unknown,
        service_id_before_connection_id_after,
        overlong_payload_length,
    ):
        message = decode_one(data)
        assert our_values(message) == pb_values(PbMessage.FromString(data[2:])), data
    assert decode_one(frame(trailer_is_ignorable)).ignorable


@pytest.mark.parametrize("size", [1, 127, 128, 16383, 16384, MAX_PAYLOAD_SIZE])
def test_common_data_layouts_never_reach_the_general_parser(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import localproxy.wire.frames

    def general_parser_called(*args: object) -> None:
        raise AssertionError("general parser used for a fast-path layout")

    monkeypatch.setattr(localproxy.wire.frames, "parse_body", general_parser_called)
    payload = bytes(size)
    for stream_id, connection_id, service_id in [(1, 0, ""), (127, 1, "SSH"), (128, 127, ""), (16383, 0, "\u00e9")]:
        expected = Message(MessageType.DATA, stream_id, payload=payload, service_id=service_id, connection_id=connection_id)
        stream = encode_frame(expected) + b"".join(encode_data_frame(stream_id, connection_id, payload, service_id))
        assert FrameDecoder().feed(stream) == [expected, expected]
        assert FrameDecoder().feed(stream)[1].service_id == service_id


# --- decoding: error paths -----------------------------------------------------

ERRORS = [
    (b"", "message has no type"),
    (b"\x10\x01", "message has no type"),
    (b"\x08\x00\x10\x01", "message has no type"),
    (b"\x08", "truncated message: a varint runs past the end"),
    (b"\x08\x01\x10\x81", "truncated message: a varint runs past the end"),
    (b"\x08\x01\x22\x05abc", "truncated message: field payload \\(5 bytes\\)"),
    (b"\x08\x01\x2a\x01\xff", "field serviceId is not valid UTF-8"),
    (b"\x08\x01\x10\x01\x22\x01x\x2a\x01\xff", "field serviceId is not valid UTF-8"),  # DATA layouts
    (b"\x08\x01\x10\x01\x2a\x01\xff\x38\x01\x22\x01x", "field serviceId is not valid UTF-8"),
    (b"\x08\x01\x10\x01\x22\x02x", "truncated message: field payload \\(2 bytes\\)"),
    (b"\x08\x01\x10\x01\x22\x01x\x2a\x05ab", "truncated message: field serviceId \\(5 bytes\\)"),
    (b"\x08\x05\x32\x02\xed\xa0", "field availableServiceIds is not valid UTF-8"),
    (b"\x08\x01\x12\x00", "field streamId \\(2\\) has the wrong wire type length-delimited"),
    (b"\x0d\x01\x00\x00\x00", "field type \\(1\\) has the wrong wire type 32-bit"),
    (b"\x08\x01\x20\x01", "field payload \\(4\\) has the wrong wire type varint"),
    (b"\x08\x01\x4e", "invalid wire type 6 in field 9"),
    (b"\x08\x01\x00", "invalid field tag 0"),
    (b"\x08\x01\x4c", "unexpected end-group tag for field 9"),
    (b"\x08\x01\x4b\x54", "unexpected end-group tag for field 10"),
    (b"\x08\x01\x4b\x50\x01", "truncated message: group of field 9"),
    (b"\x08\x01\x49\x00\x00", "truncated message: unknown field 9"),
    (b"\x08\x01\x10" + b"\x80" * 10 + b"\x00", "malformed varint: longer than 10 bytes"),
]


@pytest.mark.parametrize(("body", "reason"), ERRORS, ids=[reason for _, reason in ERRORS])
def test_invalid_bodies_raise_protocol_error(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        FrameDecoder().feed(frame(body))


def test_frame_over_limit_is_refused_from_its_length_prefix() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    assert decoder.feed(b"\x03") == []  # half a prefix: nothing known yet
    with pytest.raises(ProtocolError, match=re.escape("frame length 1001 exceeds the 1000-byte limit")):
        decoder.feed(b"\xe9")
    with pytest.raises(ProtocolError, match="frame length 2000 exceeds the 1000-byte limit"):
        FrameDecoder(max_frame_size=1000).feed(b"\x07\xd0")


def test_payload_over_limit() -> None:
    data = b"".join(encode_data_frame(1, 0, bytes(101)))
    with pytest.raises(ProtocolError, match="payload of 101 bytes exceeds the 100-byte limit"):
        FrameDecoder(max_payload_size=100).feed(data)
    assert len(decode_one(data, max_payload_size=101).payload) == 101
    odd_layout = b"\x22\x65" + bytes(101) + b"\x08\x01"  # general parser path
    with pytest.raises(ProtocolError, match="payload of 101 bytes exceeds the 100-byte limit"):
        FrameDecoder(max_payload_size=100).feed(frame(odd_layout))


@pytest.mark.parametrize("before", [b"", encode_frame(Message(MessageType.DATA, 1, payload=b"abc"))])
def test_invalid_service_id_run_before_a_payload_goes_to_the_general_parser(before: bytes) -> None:
    """The fast path keeps per-frame values in loop variables: a DATA frame whose
    serviceId run is invalid (and directly followed by the payload) must reach the
    general parser's error, not use a payload position the frame never set."""
    bad = frame(b"\x08\x01\x10\x01\x2a\x01\xff\x22\x01x")  # serviceId not UTF-8, then a payload
    with pytest.raises(ProtocolError, match="field serviceId is not valid UTF-8"):
        FrameDecoder().feed(before + bad)


def test_decoder_is_unusable_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(frame(b""))
    with pytest.raises(ProtocolError, match="unusable after an earlier error: message has no type"):
        decoder.feed(encode_frame(SAMPLES[0]))
    assert decoder.pending == 0


def test_decoder_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=MAX_FRAME_SIZE + 1)
    with pytest.raises(ValueError, match="max_payload_size"):
        FrameDecoder(max_payload_size=-1)


# --- differential property tests against google.protobuf ----------------------

texts = st.text(max_size=12)
payloads = st.one_of(st.binary(max_size=300), st.integers(0, MAX_PAYLOAD_SIZE).map(bytes))
pb_messages = st.builds(
    PbMessage,
    type=st.one_of(st.integers(1, 8), INT32.filter(bool)),
    streamId=INT32,
    ignorable=st.booleans(),
    payload=payloads,
    serviceId=texts,
    availableServiceIds=st.lists(texts, max_size=4),
    connectionId=UINT32,
)


@PROPERTY
@given(pb_messages)
def test_a_everything_protobuf_encodes_decodes_identically(pb: PbMessage) -> None:
    body = pb.SerializeToString()
    message = decode_one(frame(body))
    assert our_values(message) == pb_values(pb)
    assert not message.has_unknown_fields
    assert encode_frame(message) == frame(body)  # and back, byte for byte


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes((value,)))


scalar_fields = st.one_of(
    st.tuples(st.just(1), st.integers(1, 2**64 - 1)),
    st.tuples(st.sampled_from([2, 3, 7]), st.integers(0, 2**64 - 1)),
)
bytes_fields = st.one_of(
    st.tuples(st.just(4), st.binary(max_size=50)),
    st.tuples(st.sampled_from([5, 6]), texts.map(str.encode)),
)
unknown_fields = st.one_of(
    st.builds(lambda f, v: _varint(f << 3) + _varint(v), st.integers(8, 2**29 - 1), st.integers(0, 2**64 - 1)),
    st.builds(lambda f, b: _varint(f << 3 | 1) + b, st.integers(8, 5000), st.binary(min_size=8, max_size=8)),
    st.builds(lambda f, b: _varint(f << 3 | 2) + _varint(len(b)) + b, st.integers(8, 5000), st.binary(max_size=20)),
    st.builds(lambda f, b: _varint(f << 3 | 5) + b, st.integers(8, 5000), st.binary(min_size=4, max_size=4)),
    st.builds(lambda f, v: _varint(f << 3 | 3) + b"\x08" + _varint(v) + _varint(f << 3 | 4), st.integers(8, 5000), st.integers(0, 99)),
)


def _encode_field(field: tuple[int, object]) -> bytes:
    number, value = field
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    assert isinstance(value, bytes)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


@PROPERTY
@given(
    st.integers(1, 2**64 - 1),
    st.lists(st.one_of(scalar_fields, bytes_fields), max_size=10),
    st.lists(unknown_fields, max_size=3),
    st.randoms(use_true_random=False),
)
def test_b_any_field_order_duplicates_and_unknown_fields(
    type_value: int, fields: list[tuple[int, object]], unknown: list[bytes], rng: object
) -> None:
    pieces = [_encode_field((1, type_value))] + [_encode_field(field) for field in fields]
    rng.shuffle(pieces)  # type: ignore[attr-defined]
    body = b"".join(pieces + unknown)
    pb = PbMessage.FromString(body)
    if pb.type == 0:  # the last type field may be a zero
        with pytest.raises(ProtocolError, match="message has no type"):
            FrameDecoder().feed(frame(body))
        return
    message = decode_one(frame(body))
    assert our_values(message) == pb_values(pb)
    assert message.has_unknown_fields == bool(unknown)


ours = st.builds(
    Message,
    type=st.one_of(st.sampled_from(MessageType), INT32),
    stream_id=INT32,
    ignorable=st.booleans(),
    payload=payloads,
    service_id=texts,
    available_service_ids=st.lists(texts, max_size=4),
    connection_id=UINT32,
)


@PROPERTY
@given(ours)
def test_c_encode_frame_output_is_what_protobuf_serializes(message: Message) -> None:
    data = encode_frame(message)
    expected = to_pb(message)
    assert data == frame(expected.SerializeToString())
    assert pb_values(PbMessage.FromString(data[2:])) == our_values(message)


@PROPERTY
@given(INT32, UINT32, payloads, texts)
def test_c_encode_data_frame_parts_parse_identically(
    stream_id: int, connection_id: int, payload: bytes, service_id: str
) -> None:
    joined = b"".join(encode_data_frame(stream_id, connection_id, payload, service_id))
    expected = Message(MessageType.DATA, stream_id, payload=payload, service_id=service_id, connection_id=connection_id)
    assert pb_values(PbMessage.FromString(joined[2:])) == our_values(expected)
    assert decode_one(joined) == expected


def _feed_all(data: bytes, cuts: list[int]) -> list[Message]:
    decoder = FrameDecoder()
    messages: list[Message] = []
    previous = 0
    for cut in sorted(cuts) + [len(data)]:
        messages += decoder.feed(data[previous:cut])
        previous = cut
    return messages


@PROPERTY
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=5))
def test_d_random_bytes_only_ever_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    try:
        _feed_all(data, [min(cut, len(data)) for cut in cuts])
    except ProtocolError:
        pass


@PROPERTY
@given(pb_messages, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4), st.data())
def test_d_mutated_frames_raise_protocol_error_or_agree_with_protobuf(
    pb: PbMessage, mutations: list[tuple[int, int]], data: st.DataObject
) -> None:
    body = bytearray(pb.SerializeToString()[:300])
    for index, value in mutations:
        if body:
            body[index % len(body)] = value
    cut = data.draw(st.integers(0, len(body) + 2))
    try:
        messages = _feed_all(frame(bytes(body)), [cut])
    except ProtocolError:
        return
    assert len(messages) == 1
    try:
        parsed = PbMessage.FromString(bytes(body))
    except DecodeError:
        pytest.fail(f"we accepted a body protobuf rejects: {bytes(body)!r}")
    assert pb_values(parsed) == our_values(messages[0])


PAYLOAD_SIZES = st.one_of(st.sampled_from([0, 1, 127, 128, 129, 16383, 16384, MAX_PAYLOAD_SIZE]), st.integers(0, 300))


@PROPERTY
@given(
    st.one_of(st.integers(0, 200), st.integers(0, 20000)),
    st.integers(0, 300),
    st.sampled_from(["", "SSH", "\u00e9", "s" * 127, "s" * 128]),
    PAYLOAD_SIZES,
    st.booleans(),
    st.lists(st.tuples(st.integers(-20, 16), st.integers(0, 255)), max_size=3),
    st.sampled_from([b"", encode_frame(SAMPLES[2]), b"\x00"]),
)
def test_d_data_fast_path_layouts_and_their_mutations_agree_with_protobuf(
    stream_id: int,
    connection_id: int,
    service_id: str,
    size: int,
    our_layout: bool,
    mutations: list[tuple[int, int]],
    after: bytes,
) -> None:
    """DATA frames in both fast-path layouts, then with header or trailer bytes
    changed; a following frame (or partial prefix) sits right behind each one."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = Message(MessageType.DATA, stream_id, payload=payload, service_id=service_id, connection_id=connection_id)
    parts = encode_data_frame(stream_id, connection_id, payload, service_id)
    body = bytearray((b"".join(parts) if our_layout else encode_frame(expected))[2:])
    for index, value in mutations:  # negative: the trailing fields, else the header
        if -index <= len(body) and index < len(body):
            body[index] = value
    stream = frame(bytes(body)) + after
    if not mutations:
        assert FrameDecoder().feed(stream)[0] == expected
    try:
        message = FrameDecoder().feed(stream)[0]
    except ProtocolError:
        return
    try:
        parsed = PbMessage.FromString(bytes(body))
    except DecodeError:
        pytest.fail(f"we accepted a body protobuf rejects: {bytes(body)[:40]!r}")
    assert pb_values(parsed) == our_values(message)


# --- the hot frame cache (FrameDecoder remembers the last DATA frame's header) --


def data_frame(stream_id: int, connection_id: int, payload: bytes, service_id: str, our_layout: bool) -> bytes:
    if our_layout:
        return b"".join(encode_data_frame(stream_id, connection_id, payload, service_id))
    message = Message(MessageType.DATA, stream_id, payload=payload, service_id=service_id, connection_id=connection_id)
    return encode_frame(message)


def agree_with_protobuf(stream: bytes, messages: list[Message]) -> None:
    """Every frame of ``stream`` parsed by protobuf equals the decoded message at its index."""
    bodies = []
    pos = 0
    while pos < len(stream):
        end = pos + 2 + int.from_bytes(stream[pos : pos + 2], "big")
        bodies.append(stream[pos + 2 : end])
        pos = end
    assert [our_values(m) for m in messages] == [pb_values(PbMessage.FromString(body)) for body in bodies]


def feed_each(frames: list[bytes]) -> list[Message]:
    decoder = FrameDecoder()
    return [message for one in frames for message in decoder.feed(one)]


@pytest.mark.parametrize("our_layout", [True, False])
def test_alternating_connections_and_streams_switch_the_cache(our_layout: bool) -> None:
    ids = [(1, 1, "SSH"), (2, 1, "SSH"), (1, 2, "SSH"), (200, 3, "WEB"), (1, 1, "SSH"), (1, 1, "")]
    sizes = (3, 3, 150, 150, 35000)
    frames = [data_frame(s, c, bytes([i]) * n, sid, our_layout) for i, n in enumerate(sizes) for s, c, sid in ids]
    stream = b"".join(frames)
    agree_with_protobuf(stream, FrameDecoder().feed(stream))
    agree_with_protobuf(stream, feed_each(frames))


@pytest.mark.parametrize("our_layout", [True, False])
def test_a_frame_sharing_the_hot_header_but_with_an_extra_trailing_field(our_layout: bool) -> None:
    hot = data_frame(5, 1, b"abcdef", "SSH", our_layout)
    body = hot[2:]
    extra_fields = [b"\x38\x09", b"\x2a\x01X", b"\x40\x01", b"\x22\x01Z", b"\x10\x07", b"\x08\x02"]
    frames = [hot]
    for extra in extra_fields:
        frames.append(frame(body + extra))  # same prefix and length varint, more after the payload
        frames.append(hot)
    # Same frame length as the hot frame: two payload bytes become a trailing field.
    shrunk = bytearray(body)
    varint_at = body.index(b"\x22\x06") + 1
    shrunk[varint_at] = 4
    shrunk = shrunk[:-2] if our_layout else shrunk[: varint_at + 5] + shrunk[varint_at + 7 :]
    frames.append(frame(bytes(shrunk) + b"\x38\x05"))
    # Same frame length, payload and varint; only the trailing connectionId differs (protobuf's order).
    if not our_layout:
        frames.append(hot[:-1] + b"\x02")
    stream = b"".join(frames)
    decoded = FrameDecoder().feed(stream)
    agree_with_protobuf(stream, decoded)
    agree_with_protobuf(stream, feed_each(frames))
    assert decoded[1].connection_id == 9 and decoded[2].connection_id == 1
    assert decoded[-1].connection_id in (5, 2)


@pytest.mark.parametrize("our_layout", [True, False])
def test_hot_prefix_with_length_varints_of_one_two_and_three_bytes(our_layout: bool) -> None:
    sizes = [0, 1, 127, 128, 300, 16383, 16384, 64512, 5, 64512, 64512, 200, 200, 20000, 0]
    frames = [data_frame(9, 4, bytes([n % 251]) * n, "SSH", our_layout) for n in sizes]
    stream = b"".join(frames)
    decoded = FrameDecoder().feed(stream)
    assert [len(m.payload) for m in decoded] == sizes
    agree_with_protobuf(stream, decoded)
    agree_with_protobuf(stream, feed_each(frames))
    agree_with_protobuf(stream, feed_each([stream[i : i + 777] for i in range(0, len(stream), 777)]))


@pytest.mark.parametrize("our_layout", [True, False])
def test_oversized_payload_behind_a_hot_header_raises_the_usual_error(our_layout: bool) -> None:
    decoder = FrameDecoder(max_payload_size=100)
    assert len(decoder.feed(data_frame(1, 1, b"x" * 100, "SSH", our_layout))) == 1
    with pytest.raises(ProtocolError, match="payload of 101 bytes exceeds the 100-byte limit"):
        decoder.feed(data_frame(1, 1, b"x" * 101, "SSH", our_layout))
    decoder = FrameDecoder(max_frame_size=200)
    assert len(decoder.feed(data_frame(1, 1, b"x" * 150, "SSH", our_layout) * 2)) == 2
    with pytest.raises(ProtocolError, match="frame length .* exceeds the 200-byte limit"):
        decoder.feed(data_frame(1, 1, b"x" * 200, "SSH", our_layout))


OTHER_FRAMES = [encode_frame(m) for m in SAMPLES if m.type != MessageType.DATA] + [
    frame(b"\x08\x01\x10\x01\x22\x01a\x40\x01"),  # DATA with an unknown field
    frame(b"\x08\x01\x10\xff\xff\x03\x22\x01a"),  # 3-byte streamId
    frame(b"\x22\x01a\x08\x01\x10\x01"),  # payload first
]


@PROPERTY
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from([1, 2, 130]),
                st.sampled_from([0, 1, 2]),
                st.sampled_from(["", "SSH"]),
                st.sampled_from([0, 1, 100, 128, 3000, 16384, 64512]),
                st.booleans(),
            ),
            st.sampled_from(OTHER_FRAMES),
        ),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(0, 200_000), max_size=4),
)
def test_e_data_frame_sequences_agree_with_protobuf(
    items: list[tuple[int, int, str, int, bool] | bytes], cuts: list[int]
) -> None:
    frames = [
        item if isinstance(item, bytes) else data_frame(s, c, bytes([n % 251]) * n, service_id, our_layout)
        for item in items
        for s, c, service_id, n, our_layout in [item if isinstance(item, tuple) else (0, 0, "", 0, False)]
    ]
    stream = b"".join(frames)
    agree_with_protobuf(stream, FrameDecoder().feed(stream))
    agree_with_protobuf(stream, feed_each(frames))
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    agree_with_protobuf(stream, feed_each([stream[a:b] for a, b in itertools.pairwise(bounds)]))
