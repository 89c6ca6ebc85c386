"""Frame codec throughput: localproxy.wire.codec against plain google.protobuf (upb).

Run: ``python benchmarks/bench_codec.py [--quick] [--seconds S]``.

Every cell encodes or decodes DATA frames as a V3 peer sends them (streamId=1,
serviceId="SSH", connectionId=1) with payloads of 100 B, 4 KiB and 63 KiB (64512 B)
and prints messages/s and payload GB/s (1 GB = 1e9 bytes), then ours / protobuf.

Encode rows (each builds the message from its values, as a sender does):
- ``ours encode_frame``: ``encode_frame(Message(...))`` -> one ``bytes`` (one payload copy).
- ``ours encode_data_frame``: ``(header, payload)`` parts (zero copy).
- ``ours join(data parts)``: ``b"".join(encode_data_frame(...))`` (one copy).
- ``protobuf``: ``pack(">H", n) + Message_pb2.Message(...).SerializeToString()``.

Decode rows (the frames of one websocket message, at most 131076 bytes, or one
frame per call); a decoded frame is usable only once its fields are read, so the
protobuf rows read ``type``, ``streamId``, ``serviceId``, ``connectionId`` and ``payload`` (a copy
of the payload under upb); "parse only" skips that, as the cheapest possible
protobuf baseline:
- ``ours feed``: ``FrameDecoder.feed(buffer)`` on frames as protobuf serializes them
  (field order: the reference C++ proxy's layout).
- ``ours feed (data-frame layout)``: the same on ``encode_data_frame``'s layout.
- ``protobuf``: a Python loop over the 2-byte prefixes, ``Message.FromString`` of
  each memoryview slice, then the field reads.
"""

from __future__ import annotations

import argparse
import platform
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.internal import api_implementation  # noqa: E402

from localproxy.wire._pb.Message_pb2 import Message as PbMessage  # noqa: E402
from localproxy.wire.codec import (  # noqa: E402
    MAX_PAYLOAD_SIZE,
    MAX_WS_MESSAGE,
    FrameDecoder,
    Message,
    MessageType,
    encode_data_frame,
    encode_frame,
)

SIZES = (100, 4096, MAX_PAYLOAD_SIZE)
_PACK_PREFIX = struct.Struct(">H").pack


def measure(run: Callable[[int], object], messages_per_call: int, seconds: float) -> float:
    """Return messages/s of ``run(n)`` (which performs n calls); best of 3 timed runs."""
    calls = 1
    while True:  # calibrate: grow until one run takes >= seconds / 10 (bounded)
        start = time.perf_counter()
        run(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 10 or calls >= 1 << 24:
            break
        calls *= 4
    calls = max(1, int(calls * (seconds / 3) / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(calls)
        best = min(best, time.perf_counter() - start)
    return calls * messages_per_call / best


def encode_cells(payload: bytes) -> dict[str, tuple[Callable[[int], object], int]]:
    data_type = MessageType.DATA

    def ours_frame(n: int) -> None:
        for _ in range(n):
            encode_frame(Message(type=data_type, stream_id=1, payload=payload, service_id="SSH", connection_id=1))

    def ours_parts(n: int) -> None:
        for _ in range(n):
            encode_data_frame(1, 1, payload, "SSH")

    def ours_join(n: int) -> None:
        join = b"".join
        for _ in range(n):
            join(encode_data_frame(1, 1, payload, "SSH"))

    def protobuf(n: int) -> None:
        for _ in range(n):
            body = PbMessage(type=1, streamId=1, payload=payload, serviceId="SSH", connectionId=1).SerializeToString()
            _PACK_PREFIX(len(body)) + body

    return {
        "ours encode_frame": (ours_frame, 1),
        "ours encode_data_frame (parts)": (ours_parts, 1),
        "ours join(data parts)": (ours_join, 1),
        "protobuf": (protobuf, 1),
    }


def _protobuf_feed(buffer: bytes, read_fields: bool) -> int:
    view = memoryview(buffer)
    from_string = PbMessage.FromString
    pos, count = 0, 0
    while pos + 2 <= len(buffer):
        end = pos + 2 + ((buffer[pos] << 8) | buffer[pos + 1])
        message = from_string(view[pos + 2 : end])
        if read_fields:
            message.type, message.streamId, message.serviceId, message.connectionId, message.payload  # noqa: B018
        pos = end
        count += 1
    return count


def decode_cells(payload: bytes, batched: bool) -> dict[str, tuple[Callable[[int], object], int]]:
    expected = Message(type=MessageType.DATA, stream_id=1, payload=payload, service_id="SSH", connection_id=1)
    frame = encode_frame(expected)
    per_buffer = max(1, MAX_WS_MESSAGE // len(frame)) if batched else 1
    buffer = frame * per_buffer
    our_layout = b"".join(encode_data_frame(1, 1, payload, "SSH")) * per_buffer
    for data in (buffer, our_layout):
        assert FrameDecoder().feed(data) == [expected] * per_buffer
    assert _protobuf_feed(buffer, True) == per_buffer

    def ours(n: int) -> None:
        feed = FrameDecoder().feed
        for _ in range(n):
            feed(buffer)

    def ours_data_frame_layout(n: int) -> None:
        feed = FrameDecoder().feed
        for _ in range(n):
            feed(our_layout)

    def protobuf(n: int) -> None:
        for _ in range(n):
            _protobuf_feed(buffer, True)

    def protobuf_parse_only(n: int) -> None:
        for _ in range(n):
            _protobuf_feed(buffer, False)

    return {
        "ours feed": (ours, per_buffer),
        "ours feed (data-frame layout)": (ours_data_frame_layout, per_buffer),
        "protobuf": (protobuf, per_buffer),
        "protobuf parse only": (protobuf_parse_only, per_buffer),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short cells (~0.05 s): a smoke run")
    parser.add_argument("--seconds", type=float, default=0.3, help="time per cell (default 0.3)")
    options = parser.parse_args(argv)
    seconds = 0.05 if options.quick else options.seconds
    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"protobuf backend {api_implementation.Type()}, {platform.machine()}"
    )
    groups = [
        ("encode", encode_cells),
        ("decode, one websocket message of frames per feed", lambda p: decode_cells(p, batched=True)),
        ("decode, one frame per feed", lambda p: decode_cells(p, batched=False)),
    ]
    header = f"{'case':<32}{'payload':>8}{'msgs/s':>13}{'GB/s':>8}{'vs protobuf':>13}{'vs parse only':>15}"
    for title, make_cells in groups:
        print(f"\n{title}\n{header}\n{'-' * len(header)}")
        for size in SIZES:
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            rates = {name: measure(run, per_call, seconds) for name, (run, per_call) in make_cells(payload).items()}
            baseline = rates["protobuf"]
            parse_only = rates.get("protobuf parse only")
            for name, rate in rates.items():
                ratios = ""
                if not name.startswith("protobuf"):
                    ratios = f"{rate / baseline:12.2f}x"
                    if parse_only:
                        ratios += f"{rate / parse_only:14.2f}x"
                print(f"{name:<32}{size:>8}{rate:>13,.0f}{rate * size / 1e9:>8.2f}{ratios}")


if __name__ == "__main__":
    main()
