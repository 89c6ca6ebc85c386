"""HTTP CONNECT through an ``http://`` HTTPS_PROXY, returning the tunnelled socket.

Why our own and not websockets' ``proxy=``: the installed websockets versions
disagree on percent-decoding ``user:pass`` (15 sends it encoded, 17 decodes it),
and we want curl's rule (decode) and a clear error on every proxy failure. The
socket returned is handed to ``websockets`` with ``sock=``, which then runs TLS
and the upgrade over it. (``https://`` proxies, TLS to the proxy itself, stay
with websockets' own support.)
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.parse

from localproxy.errors import ConnectionFailedError

_MAX_ANSWER = 16 * 1024


def proxy_display(proxy_url: str) -> str:
    """The proxy address without its credentials, for messages and logs."""
    parsed = urllib.parse.urlsplit(proxy_url)
    host = f"[{parsed.hostname}]" if parsed.hostname and ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}:{parsed.port}"


def connect_request(host: str, port: int, proxy_url: str, user_agent: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {user_agent}"]
    parsed = urllib.parse.urlsplit(proxy_url)
    if parsed.username is not None:
        user = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "")
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {credentials}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_tunnel_socket(proxy_url: str, host: str, port: int, *, user_agent: str) -> socket.socket:
    """A non-blocking socket connected to ``host:port`` through the proxy (CONNECT done)."""
    parsed = urllib.parse.urlsplit(proxy_url)
    where = proxy_display(proxy_url)
    loop = asyncio.get_running_loop()
    try:
        sock = await _connect_tcp(loop, parsed.hostname or "", parsed.port or 3128)
    except OSError as exc:
        raise ConnectionFailedError(f"Cannot connect to HTTPS proxy {where}: {exc.strerror or exc}") from None
    try:
        await loop.sock_sendall(sock, connect_request(host, port, proxy_url, user_agent))
        answer = await _read_answer(loop, sock, where)
    except OSError as exc:
        sock.close()
        raise ConnectionFailedError(f"HTTPS proxy {where} dropped the connection: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        sock.close()
        raise ConnectionFailedError(f"HTTPS proxy {where} did not answer CONNECT with HTTP")
    status = int(parts[1])
    if not 200 <= status < 300:
        sock.close()
        hint = " (check the user:pass in HTTPS_PROXY)" if status == 407 else ""
        raise ConnectionFailedError(
            f"HTTPS proxy {where} refused to tunnel to {host}:{port}: HTTP {status_line.partition(' ')[2]}{hint}"
        )
    return sock


async def _connect_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last_error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last_error


async def _read_answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, where: str) -> bytes:
    answer = b""
    while b"\r\n\r\n" not in answer:  # bounded by _MAX_ANSWER
        if len(answer) > _MAX_ANSWER:
            raise ConnectionFailedError(f"HTTPS proxy {where} sent an oversized answer to CONNECT")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionFailedError(f"HTTPS proxy {where} closed the connection during CONNECT")
        answer += chunk
    head, _, extra = answer.partition(b"\r\n\r\n")
    if extra and head.split(b" ", 2)[1:2] == [b"200"]:
        # The target speaks only after us (TLS ClientHello / HTTP request): early bytes mean trouble.
        raise ConnectionFailedError(f"HTTPS proxy {where} sent unexpected bytes after CONNECT")
    return head
