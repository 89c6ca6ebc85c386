"""Generated from the protocol's Message.proto (protoc); needs ``protobuf`` (the ``test`` extra).

Only the codec tests and ``benchmarks/bench_codec.py`` use it: the proxy and the emulator
encode and decode frames by hand (``localproxy.wire.codec``).
"""
