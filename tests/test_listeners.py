"""Source listeners' addresses: an IP literal needs no resolver (issue 21: an idle source
proxy keeps no resolver thread and no idna codec for ``-b 127.0.0.1``)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from localproxy.local.listeners import listen, numeric_address_info


def test_numeric_addresses_are_answered_at_once_and_names_are_not() -> None:
    (info,) = numeric_address_info("127.0.0.1", 5555)
    assert info[0] == socket.AF_INET and info[4] == ("127.0.0.1", 5555)
    (info6,) = numeric_address_info("::1", 0)
    assert info6[0] == socket.AF_INET6 and info6[4][:2] == ("::1", 0)
    for name in ("localhost", "bücher.example", "", "127.0.0.1 ", "256.1.1.1"):
        assert numeric_address_info(name, 0) == []


async def test_listening_on_an_ip_literal_starts_no_resolver_thread() -> None:
    loop = asyncio.get_running_loop()
    if getattr(loop, "_default_executor", "absent") is not None:
        pytest.skip("this loop has a default executor already (or none to look at)")

    listeners, port = await listen("SSH", "127.0.0.1", 0, asyncio.Protocol)
    try:
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert loop._default_executor is None  # type: ignore[attr-defined]
    finally:
        for listener in listeners:
            listener.close()


async def test_a_name_still_goes_through_the_resolver() -> None:
    loop = asyncio.get_running_loop()
    listeners, port = await listen("SSH", "localhost", 0, asyncio.Protocol)
    try:
        assert port > 0 and listeners
        assert getattr(loop, "_default_executor", None) is not None or type(loop).__module__.startswith("uvloop")
    finally:
        for listener in listeners:
            listener.close()
