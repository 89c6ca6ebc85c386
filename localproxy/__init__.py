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

from localproxy._version import __version__ as __version__

if TYPE_CHECKING:  # the names as type checkers and IDEs see them; `X as X` marks a re-export
    from localproxy.config.proxy_config import (
        ProxyConfig as ProxyConfig,
    )
    from localproxy.errors import (
        AccessTokenUsedError as AccessTokenUsedError,
    )
    from localproxy.errors import (
        ClientTokenMismatchError as ClientTokenMismatchError,
    )
    from localproxy.errors import (
        ConfigError as ConfigError,
    )
    from localproxy.errors import (
        ConnectionFailedError as ConnectionFailedError,
    )
    from localproxy.errors import (
        ExitCode as ExitCode,
    )
    from localproxy.errors import (
        HandshakeRejectedError as HandshakeRejectedError,
    )
    from localproxy.errors import (
        LocalProxyError as LocalProxyError,
    )
    from localproxy.errors import (
        MissingExtraError as MissingExtraError,
    )
    from localproxy.errors import (
        ProtocolError as ProtocolError,
    )
    from localproxy.errors import (
        ServiceUnavailableError as ServiceUnavailableError,
    )
    from localproxy.errors import (
        TunnelClosedError as TunnelClosedError,
    )
    from localproxy.errors import (
        TunnelNotReadyError as TunnelNotReadyError,
    )
    from localproxy.errors import (
        UnknownServiceError as UnknownServiceError,
    )
    from localproxy.errors import (
        UsageError as UsageError,
    )
    from localproxy.events import (
        Connected as Connected,
    )
    from localproxy.events import (
        ConnectionRejected as ConnectionRejected,
    )
    from localproxy.events import (
        ConnectionReset as ConnectionReset,
    )
    from localproxy.events import (
        ConnectionStarted as ConnectionStarted,
    )
    from localproxy.events import (
        Disconnected as Disconnected,
    )
    from localproxy.events import (
        ErrorEvent as ErrorEvent,
    )
    from localproxy.events import (
        Event as Event,
    )
    from localproxy.events import (
        Listening as Listening,
    )
    from localproxy.events import (
        StreamReset as StreamReset,
    )
    from localproxy.events import (
        StreamStarted as StreamStarted,
    )
    from localproxy.events import (
        TunnelReady as TunnelReady,
    )
    from localproxy.ops.stats import (
        ProxyStats as ProxyStats,
    )
    from localproxy.proxy.local_proxy import (
        LocalProxy as LocalProxy,
    )
    from localproxy.settings import (
        Settings as Settings,
    )
    from localproxy.types import (
        DestinationTarget as DestinationTarget,
    )
    from localproxy.types import (
        InProcess as InProcess,
    )
    from localproxy.types import (
        Mode as Mode,
    )
    from localproxy.types import (
        ServiceEndpoint as ServiceEndpoint,
    )
    from localproxy.types import (
        ServiceTarget as ServiceTarget,
    )
    from localproxy.types import (
        SourcePort as SourcePort,
    )
    from localproxy.types import (
        SourceTarget as SourceTarget,
    )
    from localproxy.types import (
        SourceUnixSocket as SourceUnixSocket,
    )

__all__ = [
    "AccessTokenUsedError",
    "ClientTokenMismatchError",
    "ConfigError",
    "Connected",
    "ConnectionFailedError",
    "ConnectionRejected",
    "ConnectionReset",
    "ConnectionStarted",
    "DestinationTarget",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "ExitCode",
    "HandshakeRejectedError",
    "InProcess",
    "Listening",
    "LocalProxy",
    "LocalProxyError",
    "MissingExtraError",
    "Mode",
    "ProtocolError",
    "ProxyConfig",
    "ProxyStats",
    "ServiceEndpoint",
    "ServiceTarget",
    "ServiceUnavailableError",
    "Settings",
    "SourcePort",
    "SourceTarget",
    "SourceUnixSocket",
    "StreamReset",
    "StreamStarted",
    "TunnelClosedError",
    "TunnelNotReadyError",
    "TunnelReady",
    "UnknownServiceError",
    "UsageError",
    "__version__",
]

# name -> the module that defines it (tests/test_public_api.py keeps this and __all__ in step)
_EXPORTS: dict[str, str] = {
    "LocalProxy": "localproxy.proxy.local_proxy",
    "ProxyConfig": "localproxy.config.proxy_config",
    "ProxyStats": "localproxy.ops.stats",
    "Settings": "localproxy.settings",
    "DestinationTarget": "localproxy.types",
    "InProcess": "localproxy.types",
    "Mode": "localproxy.types",
    "ServiceEndpoint": "localproxy.types",
    "ServiceTarget": "localproxy.types",
    "SourcePort": "localproxy.types",
    "SourceTarget": "localproxy.types",
    "SourceUnixSocket": "localproxy.types",
    "Connected": "localproxy.events",
    "ConnectionRejected": "localproxy.events",
    "ConnectionReset": "localproxy.events",
    "ConnectionStarted": "localproxy.events",
    "Disconnected": "localproxy.events",
    "ErrorEvent": "localproxy.events",
    "Event": "localproxy.events",
    "Listening": "localproxy.events",
    "StreamReset": "localproxy.events",
    "StreamStarted": "localproxy.events",
    "TunnelReady": "localproxy.events",
    "AccessTokenUsedError": "localproxy.errors",
    "ClientTokenMismatchError": "localproxy.errors",
    "ConfigError": "localproxy.errors",
    "ConnectionFailedError": "localproxy.errors",
    "ExitCode": "localproxy.errors",
    "HandshakeRejectedError": "localproxy.errors",
    "LocalProxyError": "localproxy.errors",
    "MissingExtraError": "localproxy.errors",
    "ProtocolError": "localproxy.errors",
    "ServiceUnavailableError": "localproxy.errors",
    "TunnelClosedError": "localproxy.errors",
    "TunnelNotReadyError": "localproxy.errors",
    "UnknownServiceError": "localproxy.errors",
    "UsageError": "localproxy.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'localproxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
