"""localproxy: a pure-Python asyncio AWS IoT Secure Tunneling local proxy.

The public API is what this module exports (``__all__``)::

    from localproxy import LocalProxy, Mode, ProxyConfig, ServiceEndpoint, SourcePort

    async with LocalProxy(config) as proxy:
        await proxy.ready

Everything else (``localproxy.wire``, ``localproxy.tunnel``, ...) is internal and may
move; ``localproxy.testing``, ``localproxy.emulator`` and ``localproxy.agent`` are
public packages of their own. Names are imported on first use (PEP 562), so that
``import localproxy`` alone costs nothing and the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from localproxy._version import __version__

if TYPE_CHECKING:
    from localproxy.config.proxy_config import ProxyConfig
    from localproxy.errors import (
        AccessTokenUsedError,
        ClientTokenMismatchError,
        ConfigError,
        ConnectionFailedError,
        ExitCode,
        HandshakeRejectedError,
        LocalProxyError,
        ProtocolError,
        ServiceUnavailableError,
        TunnelClosedError,
        TunnelNotReadyError,
        UnknownServiceError,
        UsageError,
    )
    from localproxy.events import (
        Connected,
        ConnectionRejected,
        ConnectionReset,
        ConnectionStarted,
        Disconnected,
        ErrorEvent,
        Event,
        Listening,
        StreamReset,
        StreamStarted,
        TunnelReady,
    )
    from localproxy.ops.stats import ProxyStats
    from localproxy.proxy.local_proxy import LocalProxy
    from localproxy.settings import Settings
    from localproxy.types import (
        DestinationTarget,
        InProcess,
        Mode,
        ServiceEndpoint,
        ServiceTarget,
        SourcePort,
        SourceTarget,
        SourceUnixSocket,
    )

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "LocalProxy": "localproxy.proxy.local_proxy",
    "ProxyConfig": "localproxy.config.proxy_config",
    "ProxyStats": "localproxy.ops.stats",
    "Settings": "localproxy.settings",
    **dict.fromkeys(
        [
            "DestinationTarget", "InProcess", "Mode", "ServiceEndpoint", "ServiceTarget", "SourcePort",
            "SourceTarget", "SourceUnixSocket",
        ],
        "localproxy.types",
    ),
    **dict.fromkeys(
        [
            "Connected", "ConnectionRejected", "ConnectionReset", "ConnectionStarted", "Disconnected",
            "ErrorEvent", "Event", "Listening", "StreamReset", "StreamStarted", "TunnelReady",
        ],
        "localproxy.events",
    ),
    **dict.fromkeys(
        [
            "AccessTokenUsedError", "ClientTokenMismatchError", "ConfigError", "ConnectionFailedError",
            "ExitCode", "HandshakeRejectedError", "LocalProxyError", "ProtocolError",
            "ServiceUnavailableError", "TunnelClosedError", "TunnelNotReadyError", "UnknownServiceError",
            "UsageError",
        ],
        "localproxy.errors",
    ),
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'localproxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
