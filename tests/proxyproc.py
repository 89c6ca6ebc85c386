"""Our suite's process helpers: ``localproxy.testing.processes``, run from this checkout."""

from __future__ import annotations

from pathlib import Path

from localproxy.testing.processes import LISTENING, TIMEOUT, echo_app
from localproxy.testing.processes import ProxyProcess as _PackagedProxyProcess

__all__ = ["LISTENING", "ROOT", "TIMEOUT", "ProxyProcess", "echo_app"]

ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess(_PackagedProxyProcess):
    """Children run this checkout's code (PYTHONPATH, cwd), whatever is installed."""

    @classmethod
    async def start(
        cls,
        *args: str,
        token: str | None = None,
        extra_env: dict[str, str] | None = None,
        module: str = "localproxy",
        cwd: str | None = None,
        pythonpath: str | None = None,
    ) -> "ProxyProcess":
        child = await super().start(
            *args, token=token, extra_env=extra_env, module=module,
            cwd=cwd or str(ROOT), pythonpath=pythonpath or str(ROOT),
        )  # fmt: skip
        assert isinstance(child, ProxyProcess)
        return child
