"""Our suite's process helpers: ``localproxy.testing.processes``, run from this checkout."""

from __future__ import annotations

from pathlib import Path

from localproxy.testing.processes import LISTENING, TIMEOUT, echo_app
from localproxy.testing.processes import ProxyProcess as _PackagedProxyProcess

__all__ = ["LISTENING", "ROOT", "TIMEOUT", "ProxyProcess", "echo_app"]

ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess(_PackagedProxyProcess):
    """Children run this checkout's code (PYTHONPATH, cwd), whatever is installed."""

    default_cwd = str(ROOT)
    default_pythonpath = str(ROOT)
