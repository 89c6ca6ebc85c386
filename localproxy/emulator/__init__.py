"""A local, faithful stand-in for the AWS IoT Secure Tunneling service.

``async with Emulator(port=0) as emu:`` serves the control API (boto3, the aws CLI)
and the data-plane websockets on one port; ``python -m localproxy.emulator`` runs
it as a program. See ``core.Emulator`` for the library API.
"""

from __future__ import annotations

from localproxy.emulator.core import Emulator, TunnelInfo
from localproxy.emulator.events import EmulatorEvent
from localproxy.emulator.store import ApiError

__all__ = ["ApiError", "Emulator", "EmulatorEvent", "TunnelInfo"]
