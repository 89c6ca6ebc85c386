"""boto3 against the emulator, for tests: a client, and blocking calls run off the event loop.

boto3 is imported here, so import this module only where boto3 is wanted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

import boto3

if TYPE_CHECKING:
    from localproxy.emulator import Emulator
    from localproxy.testing.service import ThreadedEmulator

CALL_TIMEOUT = 10


def api_for(emu: Emulator | ThreadedEmulator) -> Any:
    """An unmodified boto3 ``iotsecuretunneling`` client pointed at the emulator."""
    return boto3.client(
        "iotsecuretunneling", endpoint_url=emu.api_url, region_name=emu.region,
        aws_access_key_id="x", aws_secret_access_key="x",
    )  # fmt: skip


async def call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run a blocking boto3 call in a thread, bounded in time: for an ``Emulator``
    serving on the test's own event loop, which a direct call would block (the
    fixtures' ``ThreadedEmulator`` needs none of this: call boto3 directly)."""
    return await asyncio.wait_for(asyncio.to_thread(fn, **kwargs), CALL_TIMEOUT)
