"""Socket options shared by the proxy's websocket side and the emulator's relay.

At the bottom of the package, so that the emulator uses the same values without
importing the proxy's I/O layers.
"""

from __future__ import annotations

import socket
import sys

# Linux has it in the socket module; macOS's value is 0x201; elsewhere the kernel's
# send buffer is not bounded by us (the scheduler still orders what is above it).
NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", 0x201 if sys.platform == "darwin" else None)
