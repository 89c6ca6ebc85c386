"""systemd's service notification protocol (``sd_notify``), without systemd's libraries.

A ``Type=notify`` unit gets ``NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace): each notification is one datagram of ``KEY=value`` lines
(``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). With
``WatchdogSec=`` the unit also gets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``):
``WATCHDOG=1`` must then come more often than that, and the programs send it
from their event loop every half period, so a stuck loop gets the service
restarted. Without ``NOTIFY_SOCKET`` nothing is sent and nothing fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["ServiceNotifier", "watchdog_interval"]

logger = logging.getLogger("localproxy.sdnotify")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None if unwatched."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):  # meant for another process (e.g. our parent shell)
        return None
    return int(usec) / 2_000_000


class ServiceNotifier:
    """Sends notifications to ``address`` (``NOTIFY_SOCKET``'s value); never raises."""

    def __init__(self, address: str) -> None:
        # "@name" is Linux's abstract namespace: a name starting with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)  # a full queue drops a notification, never blocks the loop
        self._warned = False
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "ServiceNotifier | None":
        address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        return cls(address) if address else None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (``notify(READY="1", STATUS="...")``); False if not delivered."""
        # A newline in a value would start a new field: STATUS is one line.
        text = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            self._socket.sendto(text.encode(), self.address)
            return True
        except OSError as error:
            if not self._warned:
                self._warned = True
                logger.warning("Cannot notify the service manager at NOTIFY_SOCKET: %s", error.strerror or error)
            return False

    def start_watchdog(self, interval: float | None) -> None:
        """Send ``WATCHDOG=1`` every ``interval`` s from the running event loop."""
        if interval is None or self._watchdog is not None:
            return
        self._watchdog = asyncio.get_running_loop().create_task(self._ping(interval), name="localproxy-watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify(WATCHDOG="1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._socket.close()
