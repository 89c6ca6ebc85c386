"""Source listeners on Unix sockets (``-s SSH=/path/to.sock``): private, checked, cleaned up.

Only the user who runs the proxy may connect (a TCP port on localhost is open to
every local user). So:

- the parent directory must exist, be owned by this user (or root), and not be
  writable by everyone unless sticky (/tmp): elsewhere another user could swap
  the socket for their own;
- the socket is created with mode 0600 with no moment where it is wider: bound in
  a fresh 0700 directory beside it, chmod-ed, then hard-linked into place (which,
  unlike a rename, never replaces what another process put there meanwhile);
  where the temporary path would be too long for a socket address, or the file
  system refuses the link, it is bound under a 0177 umask instead;
- an existing socket at the path is probed: a live one (it accepts) is an error,
  a stale one (connection refused: its proxy died) is replaced; anything that is
  not a socket is never touched;
- on close the socket file is removed, if it is still ours (same inode).

POSIX only: on Windows (no AF_UNIX in Python's socket module) it is a clear ConfigError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
from typing import Callable

from localproxy.config.paths import socket_directory_problem
from localproxy.errors import ConfigError
from localproxy.local.listeners import Listener
from localproxy.ops.peerlog import PeerLog

__all__ = ["UnixListener", "listen_unix"]

logger = logging.getLogger("localproxy.adapters")

PROBE_TIMEOUT = 2.0  # a live listener answers a Unix connect at once; a full backlog counts as live
# sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs (with the final NUL).
MAX_PATH_BYTES = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


class UnixListener:
    """A listening Unix socket; ``close()`` stops it and removes its file if still ours."""

    def __init__(self, listener: Listener, path: str, identity: tuple[int, int]) -> None:
        self.listener = listener  # the accept loop that reports running out of descriptors
        self.path = path
        self._identity = identity

    def close(self) -> None:
        self.listener.close()
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


async def listen_unix(
    service_id: str, path: str, factory: Callable[[], asyncio.Protocol], peer_log: PeerLog | None = None
) -> UnixListener:
    """Listen on the Unix socket ``path`` for ``service_id``; problems raise ConfigError."""
    name = service_id or "(default)"

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"Cannot listen on Unix socket {path} for service {name}: {reason}")

    if not hasattr(socket, "AF_UNIX") or sys.platform == "win32":
        raise fail("Unix socket sources are not available on this platform; use a port (-s SERVICE=PORT)")
    problem = socket_directory_problem(path)
    if problem is not None:
        raise fail(problem)
    await _clear_stale(path, fail)
    sock = _bind_private(path, fail)
    try:
        st = os.lstat(path)
        listener = Listener(sock, factory, peer_log or PeerLog(), f"Unix socket {path}")
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    logger.info("Listening for new connection on Unix socket %s", path)
    return UnixListener(listener, path, (st.st_dev, st.st_ino))


async def _clear_stale(path: str, fail: Callable[[str], ConfigError]) -> None:
    """Nothing at ``path``, or a stale socket (removed): else ConfigError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise fail("the path exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(probe, path), PROBE_TIMEOUT)
    except ConnectionRefusedError:
        logger.info("Replacing the stale Unix socket %s (nothing listens on it)", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise fail(f"cannot remove the stale socket: {exc.strerror or exc}") from None
        return
    except FileNotFoundError:
        return  # removed meanwhile
    except (asyncio.TimeoutError, BlockingIOError):
        raise fail("another process is listening on it (its backlog is full)") from None
    except OSError as exc:
        raise fail(f"cannot check the existing socket: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise fail("another process is listening on it already; stop it, or choose another path")


def _bind_private(path: str, fail: Callable[[str], ConfigError]) -> socket.socket:
    """A socket bound at ``path`` with mode 0600 from the start."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise fail(f"the path is too long for a Unix socket (at most {MAX_PATH_BYTES} bytes)")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        staging = tempfile.mkdtemp(prefix=".lp", dir=directory)  # mode 0700
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    try:
        temporary = os.path.join(staging, "s")
        if len(os.fsencode(temporary)) <= MAX_PATH_BYTES:
            sock = _bind_and_link(temporary, path, fail)
            if sock is not None:
                return sock
        return _bind_with_umask(path, fail)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _bind_and_link(temporary: str, path: str, fail: Callable[[str], ConfigError]) -> socket.socket | None:
    """Bind in the private directory, then link into place; None: use the umask way."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        os.link(temporary, path)
        return sock
    except FileExistsError:
        sock.close()
        raise fail("something was created at the path meanwhile; not replacing it") from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            return None  # a file system without hard links (for sockets)
        raise fail(exc.strerror or str(exc)) from None


def _bind_with_umask(path: str, fail: Callable[[str], ConfigError]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask is process-wide: only the fallback, and only for the instant of one bind.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise fail("something was created at the path meanwhile; not replacing it") from None
        raise fail(exc.strerror or str(exc)) from None
    finally:
        os.umask(old)
    return sock
