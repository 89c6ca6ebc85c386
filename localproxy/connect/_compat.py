"""TEMPORARY until branch i19's open_connection:/stdio: commits are merged (then deleted)."""

from __future__ import annotations

import asyncio
import os
import sys


async def relay_stdio(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(os.dup(0), "rb", 0))
    transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(os.dup(1), "wb", 0))

    async def up() -> None:
        while data := await stdin.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def down() -> None:
        while data := await reader.read(256 * 1024):
            transport.write(data)
        transport.close()

    t_up, t_down = asyncio.ensure_future(up()), asyncio.ensure_future(down())
    await t_down
    t_up.cancel()
    writer.close()
    _ = sys
