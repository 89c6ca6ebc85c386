"""Where the shared source of ``localproxy connect`` lives: a private per-user directory.

One shared source per (control endpoint, profile, data endpoint, thing): its Unix socket,
the lock that guards its start, its log and the id of its last tunnel are named by a hash
of that key. The directory is $LOCALPROXY_RUNTIME_DIR, else $XDG_RUNTIME_DIR/localproxy,
else ``localproxy-UID`` in the temp directory; it must be ours and mode 0700, since
whoever can reach the socket can reach the device.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from localproxy.errors import ConfigError

# Windows has AF_UNIX in recent builds but asyncio has no Unix-socket servers there:
# there each connect runs its own source (no sharing).
SHARING = hasattr(socket, "AF_UNIX") and sys.platform != "win32"


def runtime_dir() -> Path:
    chosen = os.environ.get("LOCALPROXY_RUNTIME_DIR")
    if not chosen:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg):
            chosen = os.path.join(xdg, "localproxy")
        else:
            chosen = os.path.join(tempfile.gettempdir(), f"localproxy-{_uid()}")
    path = Path(chosen)
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"cannot use {path} for the shared source: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink?): remove it")
    if SHARING and (info.st_uid != _uid() or info.st_mode & 0o077):
        raise ConfigError(
            f"{path} must be owned by you and private (mode 0700) since its socket reaches your devices: "
            f"chmod 700 {path}, or set LOCALPROXY_RUNTIME_DIR"
        )
    return path


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


@dataclass(frozen=True)
class SharedPaths:
    directory: Path
    key: str

    @property
    def socket(self) -> Path:
        return self.directory / f"{self.key}.sock"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.key}.lock"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.key}.log"

    @property
    def last_tunnel(self) -> Path:
        return self.directory / f"{self.key}.tunnel"

    @property
    def pid(self) -> Path:
        return self.directory / f"{self.key}.pid"

    @property
    def status(self) -> Path:
        return self.directory / f"{self.key}.status"


def shared_paths(thing: str, region: str | None, endpoint: str | None, api_url: str | None) -> SharedPaths:
    profile = os.environ.get("AWS_PROFILE", "")
    text = "\0".join((thing, region or "", endpoint or "", api_url or "", profile))
    return SharedPaths(runtime_dir(), hashlib.sha256(text.encode()).hexdigest()[:20])
