"""Reading a file the user named: bounded, never blocking, never a traceback.

Every file the proxy, the agent and the emulator read on a user's say-so
(``--config``, ``--settings-json``, ``--config-dir`` files, ``--client-token-file``,
certificates) goes through here. ``open()`` of a FIFO blocks until a writer
comes (in the event loop: SIGTERM is never handled), a device such as
``/dev/zero`` never ends, and a huge file fills memory. So: the path is
``stat``-ed and must be a regular file, it is opened ``O_NONBLOCK`` (a FIFO
swapped in after the ``stat`` cannot block the ``open``), ``fstat``-ed again,
and at most ``limit`` bytes are read. Anything else is an
:class:`UnsuitableFile` whose reason names the kind of file, never its content.
"""

from __future__ import annotations

import os
import re
import stat

from localproxy.errors import ConfigError

__all__ = [
    "MAX_CA_ENTRIES",
    "MAX_CONFIG_BYTES",
    "ca_directory_problem",
    "MAX_SMALL_FILE_BYTES",
    "UnsuitableFile",
    "check_regular_file",
    "file_kind",
    "read_bounded",
    "read_user_text",
]

# A --config or --settings-json file is a few KiB; 1 MiB is generous and still cheap.
MAX_CONFIG_BYTES = 1 << 20
# A client token file holds one token (at most 128 characters and a newline).
MAX_SMALL_FILE_BYTES = 4096

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnsuitableFile(ValueError):
    """The path exists but is not a regular file within the size bound; ``str()`` says why."""


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a character device``...: what a non-regular file is, for messages."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _check(mode: int, size: int, limit: int) -> None:
    if not stat.S_ISREG(mode):
        kind = file_kind(mode)
        raise UnsuitableFile(f"not a regular file ({kind})" if kind.startswith("a") else kind)
    if size > limit:
        raise UnsuitableFile(f"larger than the {limit}-byte limit ({size} bytes)")


def check_regular_file(path: str, limit: int = MAX_CONFIG_BYTES) -> None:
    """Raise :class:`UnsuitableFile` unless ``path`` is a regular file of at most ``limit`` bytes.

    For files another library opens (OpenSSL's certificates): it cannot block on a
    FIFO if it never sees one. ``OSError`` (``FileNotFoundError``...) passes through.
    """
    info = os.stat(path)
    _check(info.st_mode, info.st_size, limit)


def read_bounded(path: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), without blocking.

    Raises :class:`UnsuitableFile` (a FIFO, a device, a directory, too large) or
    ``OSError`` (missing, no permission...), which callers turn into their error.
    """
    check_regular_file(path, limit)  # before open(): opening a device can have effects
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)  # what was opened, should the path have changed since the stat
        _check(info.st_mode, info.st_size, limit)
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # a file that grows while read is still cut at the bound
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise UnsuitableFile(f"larger than the {limit}-byte limit")
    return b"".join(chunks)


def read_user_text(path: str, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """UTF-8 text of ``path``; :class:`ConfigError` ``Cannot read {what} {path}: reason`` otherwise.

    The reason never quotes the file's content (it may hold a token).
    """
    try:
        data = read_bounded(path, limit)
    except UnsuitableFile as error:
        raise ConfigError(f"Cannot read {what} {path}: {error}") from None
    except OSError as error:
        raise ConfigError(f"Cannot read {what} {path}: {error.strerror or type(error).__name__}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"Cannot read {what} {path}: not UTF-8 text (byte {error.start})") from None


# OpenSSL's hashed CA directory (``-c``/``--capath``): ``<8 hex>.<n>`` certificates and
# ``<8 hex>.r<n>`` CRLs, opened during a TLS handshake, in the event loop.
_CA_NAME = re.compile(r"^[0-9a-fA-F]{8}\.r?[0-9]+$")
MAX_CA_ENTRIES = 10_000  # a CA directory holds hundreds; look no further


def ca_directory_problem(path: str) -> str | None:
    """Why OpenSSL could block or fill memory reading the CA directory ``path`` (None: fine).

    A FIFO or a device named like a certificate hash would block the handshake, and
    with it the whole event loop (SIGTERM included), when OpenSSL opens it.
    """
    try:
        entries = os.scandir(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    with entries:
        for count, entry in enumerate(entries):
            if count >= MAX_CA_ENTRIES:
                return None
            if not _CA_NAME.match(entry.name):
                continue
            try:
                st = os.stat(entry.path)  # follows symlinks, as OpenSSL does
            except OSError:
                continue  # a dangling link: OpenSSL skips it too
            if not stat.S_ISREG(st.st_mode):
                return f"holds {entry.name!r}, which is {file_kind(st.st_mode)}, not a certificate file"
            if st.st_size > MAX_CONFIG_BYTES:
                return f"holds {entry.name!r}, which is over {MAX_CONFIG_BYTES:,} bytes"
    return None
