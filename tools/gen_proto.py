"""Regenerate localproxy/wire/_pb/Message_pb2.py from proto/Message.proto.

Needs the dev extra (grpcio-tools bundles protoc): pip install -e '.[dev]'
Run from anywhere: python tools/gen_proto.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from grpc_tools import protoc  # dev-only dependency

    out = ROOT / "localproxy" / "wire" / "_pb"
    args = [
        "protoc",
        f"--proto_path={ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        str(ROOT / "proto" / "Message.proto"),
    ]
    rc = protoc.main(args)
    if rc == 0:
        print(f"wrote {out / 'Message_pb2.py'}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
