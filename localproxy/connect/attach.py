"""The attach protocol between a ``connect`` client and the shared source, sans-I/O.

Over the private Unix socket, the client sends one JSON line (the request); the server
answers with JSON lines: any number of ``{"say": TEXT}`` (progress, for stderr), then
``{"ok": true}`` followed by the raw bytes of the connection, or ``{"error": TEXT,
"code": N}`` and the end. JSON lines keep it readable and extensible; after "ok" there
is no framing, so the stream costs nothing per byte: the server hands the socket itself to
the source proxy. When the connection has ended, the client may ask why on a new link with
``{"v": 1, "why": true}``: the answer is ``{"ok": true}`` (a normal end) or the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 64 * 1024
VERSION = 1


@dataclass(frozen=True)
class Request:
    service: str
    wait: float
    close_on_exit: bool = False
    why: bool = False  # not a connection: why did my connection end?

    def encode(self) -> bytes:
        if self.why:
            return json.dumps({"v": VERSION, "why": True}).encode() + b"\n"
        body = {"v": VERSION, "service": self.service, "wait": self.wait, "close_on_exit": self.close_on_exit}
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Request":
        """Raises ValueError on anything but a well-formed request."""
        body = _object(line)
        if body.get("v") == VERSION and body.get("why") is True:
            return cls("", 0.0, why=True)
        service, wait = body.get("service"), body.get("wait")
        if body.get("v") != VERSION or not isinstance(service, str) or not service:
            raise ValueError("bad request")
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 <= wait <= 86400:
            raise ValueError("bad wait")
        return cls(service, float(wait), body.get("close_on_exit") is True)


@dataclass(frozen=True)
class Reply:
    """One server line: ``say`` (progress), ``ok`` (bytes follow), or ``error`` with ``code``."""

    say: str | None = None
    ok: bool = False
    error: str | None = None
    code: int = 0

    def encode(self) -> bytes:
        if self.ok:
            body: dict[str, Any] = {"ok": True}
        elif self.error is not None:
            body = {"error": self.error, "code": self.code}
        else:
            body = {"say": self.say or ""}
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "Reply":
        body = _object(line)
        if body.get("ok") is True:
            return cls(ok=True)
        if isinstance(body.get("error"), str) and isinstance(body.get("code"), int):
            return cls(error=body["error"], code=body["code"])
        if isinstance(body.get("say"), str):
            return cls(say=body["say"])
        raise ValueError("bad reply")


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise ValueError("line too long or cut short")
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body
