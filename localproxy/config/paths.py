"""Checks of the directory a Unix socket source goes in (``-s SSH=/path/to.sock``).

Plain ``os.stat`` checks, so the command line can refuse a bad directory before
connecting (a clear message on stderr, exit 2), and the listener checks it again
when it binds (``localproxy.local.unix``): the directory may change in between.
"""

from __future__ import annotations

import os
import stat

__all__ = ["socket_directory_problem"]


def socket_directory_problem(path: str) -> str | None:
    """Why a Unix socket at ``path`` would not be private to this user, or None."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return f"the directory {directory} does not exist (create it with mode 0700)"
    except OSError as exc:
        return f"cannot use the directory {directory}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return (
            f"the directory {directory} is writable by every user (mode {mode:04o}, no sticky bit): "
            "another user could replace the socket. Use a private directory (mode 0700), "
            "e.g. under $XDG_RUNTIME_DIR or your home directory"
        )
    geteuid = getattr(os, "geteuid", None)  # POSIX only; Unix sockets are refused elsewhere anyway
    if geteuid is not None and st.st_uid not in (geteuid(), 0):
        return (
            f"the directory {directory} belongs to another user (uid {st.st_uid}), who could replace "
            "the socket. Use a directory of your own"
        )
    return None
