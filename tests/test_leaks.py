"""No leaks over many cycles: file descriptors (``/proc/self/fd``) and asyncio tasks of
the whole in-process rig (emulator, both proxies, the app) are back to their level after
1000 connect/close cycles through a tunnel, and after repeated session drops.
"""

from __future__ import annotations

import asyncio
from typing import Any

TIMEOUT = 10.0
CYCLES = 1000
FD_TOLERANCE = 4
TASK_TOLERANCE = 2


async def settle(app: Any, expected_connections: int) -> None:
    """Until the app saw ``expected_connections`` connections and every one of them ended."""

    async def check() -> None:
        while len(app.closed) < expected_connections or not all(f.done() for f in app.closed):
            app.progress.clear()
            await app.progress.wait()

    await asyncio.wait_for(check(), TIMEOUT)


async def quiesce(fd_count: Any, before: int) -> int:
    """The fd count once closes in flight (transports closing after a flush) are done."""
    count = fd_count()
    for _ in range(100):  # bounded: transports close within a few loop iterations
        if count <= before + FD_TOLERANCE:
            return int(count)
        await asyncio.sleep(0.01)
        count = fd_count()
    return int(count)


async def one_cycle(pair: Any, payload: bytes) -> None:
    reader, writer = await pair.connect()
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT) == payload
    writer.close()
    await writer.wait_closed()


async def test_thousand_connect_close_cycles_leak_nothing(emulator: Any, rel_kit: Any,
                                                           rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})
    for index in range(20):  # warm-up: first-use allocations, lazily created tasks
        await one_cycle(pair, b"w%d" % index)
    await settle(app, 20)
    fds_before = rel_kit.fd_count()
    tasks_before = len(asyncio.all_tasks())

    for index in range(CYCLES):
        await one_cycle(pair, b"cycle %d" % index)
    await settle(app, 20 + CYCLES)

    fds_after = await quiesce(rel_kit.fd_count, fds_before)
    tasks_after = len(asyncio.all_tasks())
    assert fds_after <= fds_before + FD_TOLERANCE, f"fds {fds_before} -> {fds_after}"
    assert tasks_after <= tasks_before + TASK_TOLERANCE, f"tasks {tasks_before} -> {tasks_after}"
    assert len(app.conns) == 20 + CYCLES and all(app.closed[i].result() for i in range(len(app.closed)))
    await app.close()


async def test_simultaneous_connections_leave_nothing_behind(emulator: Any, rel_kit: Any,
                                                            rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app},
                                  source_kw={"settings": rel_kit.settings(tcp_max_active_connections=300)},
                                  destination_kw={"settings": rel_kit.settings(tcp_max_active_connections=300)})
    await one_cycle(pair, b"warm-up")
    await settle(app, 1)
    fds_before = rel_kit.fd_count()
    tasks_before = len(asyncio.all_tasks())
    await asyncio.gather(*(one_cycle(pair, b"parallel %d" % index) for index in range(200)))
    await settle(app, 201)
    fds_after = await quiesce(rel_kit.fd_count, fds_before)
    assert fds_after <= fds_before + FD_TOLERANCE, f"fds {fds_before} -> {fds_after}"
    assert len(asyncio.all_tasks()) <= tasks_before + TASK_TOLERANCE
    await app.close()


async def test_session_drops_leak_nothing(emulator: Any, rel_kit: Any, rel_pair_factory: Any) -> None:
    app = await rel_kit.App("echo").start()
    pair = await rel_pair_factory(emulator, {"SSH": app})

    async def drop_and_recover(index: int) -> None:
        reader, writer = await pair.connect()  # an open connection dies with each session
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), TIMEOUT)
        await emulator.drop(pair.tunnel.tunnel_id, "source" if index % 2 else "destination")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await pair.wait_serving()
        await one_cycle(pair, b"after drop %d" % index)

    await drop_and_recover(0)
    await settle(app, 2)
    fds_before = rel_kit.fd_count()
    tasks_before = len(asyncio.all_tasks())
    for index in range(1, 21):
        await drop_and_recover(index)
    await settle(app, 42)
    fds_after = await quiesce(rel_kit.fd_count, fds_before)
    assert fds_after <= fds_before + FD_TOLERANCE, f"fds {fds_before} -> {fds_after}"
    assert len(asyncio.all_tasks()) <= tasks_before + TASK_TOLERANCE
    await app.close()
