"""A destination app that stops reading: the sender is paced (what it can write stays
bounded), both proxy processes keep a bounded RSS, and once the app reads again every
byte arrives intact. The proxies run as real ``python -m localproxy`` processes so
their memory can be measured on their own (from /proc).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any

TIMEOUT = 20.0
MIB = 1024 * 1024
TOTAL = 96 * MIB
CHUNK = 256 * 1024
HELD_BOUND = 16 * MIB  # bytes held by the processes on the path (the kernel's socket queues aside)
RSS_BOUND_KIB = 64 * 1024


async def start_proxies(emulator: Any, rel_processes: Any, app: Any) -> tuple[Any, Any, int]:
    tunnel = emulator.open_tunnel(services=["SSH"])
    destination = await rel_processes("-e", emulator.data_url, "-d", f"SSH=127.0.0.1:{app.port}",
                                      env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.destination_token})
    source = await rel_processes("-e", emulator.data_url, "-s", "SSH=0", "-b", "127.0.0.1",
                                 env={"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token})
    port = int((await source.wait_for_line(r"Listening for new connection on port (\d+)")).group(1))
    await emulator.wait_connected(tunnel.tunnel_id, "destination")
    return source, destination, port


async def wait_plateau(read: Any, step: float = 0.1, still_steps: int = 5, limit: float = TIMEOUT) -> int:
    """Sample ``read()`` every ``step`` s until it stopped growing for ``still_steps`` samples."""
    last, still = -1, 0
    for _ in range(int(limit / step)):
        value = read()
        still = still + 1 if value == last else 0
        if still >= still_steps:
            return int(value)
        last = value
        await asyncio.sleep(step)  # sampling a steady state, not waiting for readiness
    raise AssertionError(f"never settled: still growing at {last}")


async def test_stalled_reader_paces_the_sender_and_bounds_memory(emulator: Any, rel_kit: Any,
                                                                 rel_processes: Any) -> None:
    app = await rel_kit.App("sink").start()
    app.read_gate.clear()  # the app accepts, then reads nothing
    source, destination, port = await start_proxies(emulator, rel_processes, app)
    blob = os.urandom(TOTAL)
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setblocking(False)
    sent = 0

    async def send_all() -> None:
        nonlocal sent
        view = memoryview(blob)
        for offset in range(0, TOTAL, CHUNK):
            await loop.sock_sendall(sock, view[offset : offset + CHUNK])
            sent = offset + CHUNK

    sender = asyncio.create_task(send_all())
    try:
        await asyncio.wait_for(app.accepted.wait(), TIMEOUT)
        paced_at = await wait_plateau(lambda: sent)
        # What the sender could write = kernel socket queues on the 4 hops (sized by the
        # host's tcp_rmem/tcp_wmem, outside any process) + what the processes hold.
        in_kernel = rel_kit.kernel_queued({port, app.port, int(emulator.data_url.rsplit(":", 1)[1])})
        peaks = {p.pid: rel_kit.rss_kib(p.pid) for p in (source, destination)}
        assert not sender.done() and paced_at < TOTAL * 3 // 4, f"not paced: {paced_at / MIB:.1f} MiB sent"
        held = paced_at - in_kernel
        assert held < HELD_BOUND, (
            f"sent {paced_at / MIB:.1f} MiB, {in_kernel / MIB:.1f} MiB in kernel queues: "
            f"{held / MIB:.1f} MiB held by the proxies and the emulator")
        for pid, rss in peaks.items():
            assert 0 < rss < RSS_BOUND_KIB, f"proxy {pid} RSS {rss} KiB while the reader is stalled"

        app.read_gate.set()
        await asyncio.wait_for(sender, TIMEOUT)
        await app.wait_received(0, TOTAL, TIMEOUT)
        assert hashlib.sha256(app.conns[0]).digest() == hashlib.sha256(blob).digest()
        for process in (source, destination):
            assert rel_kit.rss_kib(process.pid) < RSS_BOUND_KIB
    finally:
        sender.cancel()
        sock.close()
    assert await source.stop() == 0
    assert await destination.stop() == 0
    await app.close()
