"""localproxy: a pure-Python asyncio AWS IoT Secure Tunneling local proxy."""

from __future__ import annotations

__version__ = "0.1.0"
