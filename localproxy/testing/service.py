"""``ThreadedEmulator``: the emulator on a thread and event loop of its own (what ``tunneling_service`` is).

Like moto's ``ThreadedMotoServer``: boto3, sockets and subprocesses of a ``def`` test, or
blocking calls in an ``async def`` test, reach it without ``asyncio.to_thread`` and
cannot deadlock it. It has the :class:`~localproxy.emulator.Emulator`'s API, in two kinds:

- state calls (``open_tunnel``, ``rotate``, ``close_tunnel``, ``describe``, ``list_tunnels``,
  ``tunnel``, ``advance_time``, ``fail_next_handshakes``, ``set_bandwidth``, ``sessions``,
  ``handshake_count``, ``event_mark``, ``notifications``) run on the emulator's thread
  and return their value in any test (they take microseconds). ``open_tunnel``'s
  value can also be awaited (``await svc.open_tunnel(...)``), as the README showed.
- waits and hooks on live websockets (``wait_connected``, ``wait_disconnected``,
  ``wait_event``, ``drop``, ``send_session_reset``, ``send_stream_reset``, ``inject_raw``)
  start at once on the emulator's thread; in a thread running an event loop (an ``async
  def`` test) they return a future to ``await``, elsewhere they block until done.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from localproxy.emulator import Emulator, EmulatorEvent, TunnelInfo
from localproxy.emulator.store import Tunnel
from localproxy.testing.loop_thread import LoopThread


class OpenedTunnel(TunnelInfo):
    """A :class:`TunnelInfo` that ``await`` also yields (``await svc.open_tunnel(...)``)."""

    def __await__(self) -> Generator[Any, None, OpenedTunnel]:
        return self
        yield  # a generator that finishes at once: awaiting costs no loop iteration


class ThreadedEmulator:
    """``with ThreadedEmulator(port=0) as svc:`` a started emulator on its own thread (``Emulator``'s arguments)."""

    def __init__(self, **emulator_args: Any) -> None:
        self._args = emulator_args
        self._runner = LoopThread("localproxy-emulator")
        self._emulator: Emulator | None = None

    def __enter__(self) -> ThreadedEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._runner.start()

        async def started() -> Emulator:
            emulator = Emulator(**self._args)
            await emulator.start()
            return emulator

        try:
            self._emulator = self._runner.run(started())
        except BaseException:  # e.g. MissingExtraError: tls=True without localproxy[emulator-tls]
            self._runner.stop()
            raise

    def stop(self) -> None:
        """Stop the emulator (its connections close) and its thread; again is a no-op."""
        emulator, self._emulator = self._emulator, None
        try:
            if emulator is not None:
                self._runner.run(emulator.stop())
        finally:
            self._runner.stop()

    @property
    def emulator(self) -> Emulator:
        """The emulator itself, for white-box checks: its state belongs to its thread (see ``call``)."""
        if self._emulator is None:
            raise RuntimeError("the emulator is not running")
        return self._emulator

    @property
    def loop_thread(self) -> LoopThread:
        return self._runner

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` on the emulator's thread, e.g. ``svc.call(svc.emulator.relay.kick, ...)``."""
        return self._runner.call(function, *args, **kwargs)

    # --- addresses (plain values, read from any thread) -------------------------

    host = property(lambda self: self.emulator.host)
    port = property(lambda self: self.emulator.port)
    tls = property(lambda self: self.emulator.tls)
    region = property(lambda self: self.emulator.region)
    api_url = property(lambda self: self.emulator.api_url)
    data_url = property(lambda self: self.emulator.data_url)
    mqtt_url = property(lambda self: self.emulator.mqtt_url)

    @property
    def ca_pem_path(self) -> Path | None:
        return self.emulator.ca_pem_path

    @property
    def capath(self) -> Path | None:
        return self.emulator.capath

    # --- state calls: a value in any test ----------------------------------------

    def open_tunnel(self, services: list[str] | None = None, thing_name: str | None = None, **options: Any) -> OpenedTunnel:
        info: TunnelInfo = self.call(self.emulator.open_tunnel, services, thing_name, **options)
        return OpenedTunnel(info.tunnel_id, info.tunnel_arn, info.source_token, info.destination_token)

    def rotate(self, tunnel_id: str, mode: str, services: list[str] | None = None, thing_name: str | None = None) -> dict[str, str]:
        result: dict[str, str] = self.call(self.emulator.rotate, tunnel_id, mode, services, thing_name)
        return result

    def close_tunnel(self, tunnel_id: str, delete: bool = False) -> None:
        self.call(self.emulator.close_tunnel, tunnel_id, delete)

    def describe(self, tunnel_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call(self.emulator.describe, tunnel_id)
        return result

    def list_tunnels(self, thing_name: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(self.emulator.list_tunnels, thing_name)
        return result

    def tunnel(self, tunnel_id: str) -> Tunnel:
        result: Tunnel = self.call(self.emulator.tunnel, tunnel_id)
        return result

    def advance_time(self, seconds: float) -> None:
        self.call(self.emulator.advance_time, seconds)

    def fail_next_handshakes(self, count: int, status: int = 503) -> None:
        self.call(self.emulator.fail_next_handshakes, count, status)

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        self.call(self.emulator.set_bandwidth, bytes_per_second)

    def sessions(self, tunnel_id: str, side: Any) -> int:
        result: int = self.call(self.emulator.sessions, tunnel_id, side)
        return result

    def handshake_count(self, tunnel_id: str, side: Any) -> int:
        result: int = self.call(self.emulator.handshake_count, tunnel_id, side)
        return result

    def event_mark(self) -> int:
        result: int = self.call(self.emulator.event_mark)
        return result

    def notifications(self, thing_name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(self.emulator.notifications, thing_name)
        return result

    # --- waits and live hooks: awaitable in an async test, blocking in a sync one --

    def wait_connected(self, tunnel_id: str, side: Any, timeout: float = 10) -> Any:
        return self._runner.dual(self.emulator.wait_connected(tunnel_id, side, timeout))

    def wait_disconnected(self, tunnel_id: str, side: Any, timeout: float = 10) -> Any:
        return self._runner.dual(self.emulator.wait_disconnected(tunnel_id, side, timeout))

    def wait_event(self, kind: str, *, since: int = 0, timeout: float = 10, **match: Any) -> Any:
        """The first ``EmulatorEvent`` of ``kind`` after ``since`` (awaitable in an async test)."""
        waited: Any = self.emulator.wait_event(kind, since=since, timeout=timeout, **match)
        return self._runner.dual(waited)

    def drop(self, tunnel_id: str, side: Any, abort: bool = False) -> Any:
        return self._runner.dual(self.emulator.drop(tunnel_id, side, abort))

    def send_session_reset(self, tunnel_id: str, side: Any) -> Any:
        return self._runner.dual(self.emulator.send_session_reset(tunnel_id, side))

    def send_stream_reset(self, tunnel_id: str, side: Any, stream_id: int, service_id: str = "") -> Any:
        return self._runner.dual(self.emulator.send_stream_reset(tunnel_id, side, stream_id, service_id))

    def inject_raw(self, tunnel_id: str, side: Any, data: bytes) -> Any:
        return self._runner.dual(self.emulator.inject_raw(tunnel_id, side, data))


__all__ = ["EmulatorEvent", "OpenedTunnel", "ThreadedEmulator"]
