"""The emulator's listening port: websockets' server with the data-plane hooks.

``process_request`` answers injected 5xx faults and every refusal of
``handshake.evaluate``; ``process_response`` adds ``channel-id`` to every reply
(101 included) and commits the token only when the upgrade really succeeded.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from localproxy.emulator.events import EventLog
from localproxy.emulator.faults import Faults
from localproxy.emulator.front import FrontConfig, FrontConnection
from localproxy.emulator.handshake import (
    Rejection,
    choose_subprotocol,
    commit,
    evaluate,
)
from localproxy.emulator.relay import Relay
from localproxy.emulator.store import Store
from localproxy.wire.codec import MAX_WS_MESSAGE

logger = logging.getLogger("localproxy.emulator.server")

SERVER_HEADER = "localproxy-emulator"
SECRET_HEADERS = frozenset({"access-token", "client-token", "cookie"})


class _SecretHeaderFilter(logging.Filter):
    """Mask token headers in websockets' debug dump of the request ("< name: value")."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in SECRET_HEADERS:
            record.args = (args[0], "<redacted>")
        return True


# websockets logs through this logger (not "websockets.server"): our filter, our levels.
websockets_logger = logging.getLogger("localproxy.emulator.websockets")
websockets_logger.addFilter(_SecretHeaderFilter())


class DataPlane:
    def __init__(self, store: Store, faults: Faults, relay: Relay, events: EventLog) -> None:
        self.store = store
        self.faults = faults
        self.relay = relay
        self.events = events

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        assert isinstance(connection, FrontConnection)
        status = self.faults.take_handshake_failure()
        if status is not None:
            body = "Service Unavailable: the emulator was told to fail this handshake (fault injection)"
            return self._refuse(connection, Rejection(status, body))
        result = evaluate(self.store, request.path, request.headers)
        if isinstance(result, Rejection):
            return self._refuse(connection, result)
        connection.admission = result
        return None

    def _refuse(self, connection: FrontConnection, rejection: Rejection) -> Response:
        logger.info("handshake refused (channel %s): %d %s", connection.channel_id, rejection.status, rejection.body)
        self.events.emit("handshake_rejected", status=rejection.status, body=rejection.body, channel_id=connection.channel_id)
        return connection.respond(rejection.status, rejection.body)

    def process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        assert isinstance(connection, FrontConnection)
        response.headers["channel-id"] = connection.channel_id
        admission = connection.admission
        if admission is None:
            return
        if response.status_code == 101:
            commit(admission)
            self.relay.count_handshake(admission)
        else:  # websockets itself refused (not a valid upgrade): the token stays unused
            connection.admission = None

    def select_subprotocol(self, connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return choose_subprotocol(list(offered))

    async def handler(self, connection: ServerConnection) -> None:
        assert isinstance(connection, FrontConnection)
        if connection.admission is None:  # pragma: no cover - process_request always admits first
            await connection.close(1011, "not admitted")
            return
        await self.relay.run(connection, connection.admission, connection.channel_id)


async def start_server(
    plane: DataPlane,
    front: FrontConfig,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    segment_size: int | None = None,
) -> Server:
    """Serve on ``host:port``; ``segment_size`` clamps the TCP MSS of accepted connections
    (see ``Emulator``: loopback's 64 KiB segments and a small receive window stall TCP)."""
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["ssl"] = ssl_context
        kwargs["ssl_handshake_timeout"] = 10
    address: tuple[str | None, int | None] = (host, port)
    if segment_size is not None:
        kwargs["sock"] = _listening_socket(host, port, segment_size)
        address = (None, None)
    return await serve(
        plane.handler,
        *address,
        # websockets only calls it like the class; its annotation asks for the class itself
        create_connection=functools.partial(FrontConnection, front=front),  # type: ignore[arg-type]
        process_request=plane.process_request,
        process_response=plane.process_response,
        select_subprotocol=plane.select_subprotocol,
        server_header=SERVER_HEADER,
        logger=websockets_logger,
        compression=None,  # the service negotiates no extension
        open_timeout=None,  # FrontConnection times out request heads itself
        max_size=MAX_WS_MESSAGE,
        max_queue=16,  # messages read ahead of the relay (fewer once bounded: see relay.py)
        write_limit=2**18,  # send() waits above 256 KiB buffered: backpressure to the sender
        # With an idle timeout the emulator sends no pings of its own: they would keep
        # every websocket busy, hiding an idle link from its "load balancer".
        ping_interval=None if front.ws_idle_timeout is not None else 20,
        **kwargs,
    )


def _listening_socket(host: str, port: int, segment_size: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, segment_size)  # inherited by accepted sockets
        sock.bind(address)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
