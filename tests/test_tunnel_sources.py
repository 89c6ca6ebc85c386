"""Sans-I/O: the source targets beyond a TCP port (Unix socket, in-process) in the tunnel state."""

from __future__ import annotations

from typing import Any, Iterable

import pytest

from localproxy.errors import ConfigError
from localproxy.events import TunnelReady
from localproxy.settings import V1, V3
from localproxy.tunnel.actions import Fatal, Listen, StopListen
from localproxy.tunnel.services import resolve_services
from localproxy.tunnel.state import TunnelState
from localproxy.types import (
    DestinationTarget,
    InProcess,
    Mode,
    SourcePort,
    SourceUnixSocket,
)
from localproxy.wire.codec import Message, MessageType


def of(actions: Iterable[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def service_ids(*ids: str) -> Message:
    return Message(MessageType.SERVICE_IDS, available_service_ids=list(ids))


def test_unix_socket_listens_in_process_does_not() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": SourceUnixSocket("/run/x/ssh.sock"), "RDP": InProcess()})
    tunnel.session_started(V3)
    out = tunnel.receive([service_ids("SSH", "RDP", "WEB")])
    # WEB is not configured: no listener (issue 22: only the services the user configured)
    assert of(out, Listen) == [Listen("SSH", 0, "/run/x/ssh.sock")]
    assert of(out, TunnelReady) == [TunnelReady(("SSH", "RDP"))]

def test_in_process_service_has_no_listener_to_stop() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"RDP": InProcess(), "WEB": SourcePort(0)})
    tunnel.session_started(V3)
    assert of(tunnel.receive([service_ids("RDP", "WEB")]), Listen) == [Listen("WEB", 0)]
    tunnel.session_lost()
    tunnel.session_started(V3)
    out = tunnel.receive([service_ids("RDP", "WEB")])
    assert of(out, StopListen) == [] and of(out, Listen) == []  # WEB still listens; RDP never did


def test_unmapped_services_get_no_listener_when_asked() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": InProcess()}, listen_unmapped=False)
    tunnel.session_started(V3)
    out = tunnel.receive([service_ids("SSH", "WEB")])
    assert of(out, Listen) == []
    assert tunnel.services == {"SSH": InProcess(), "WEB": InProcess()}
    assert resolve_services(Mode.SOURCE, {}, None, unmapped=InProcess()) == {"": InProcess()}


@pytest.mark.parametrize(
    "configured, ids, name, served",
    [
        ({"SSH": InProcess()}, ["SSH", "WEB"], "SSH", "SSH"),
        ({"SSH": InProcess()}, ["SSH", "WEB"], "WEB", None),  # not configured: not served (issue 22)
        ({"SSH": InProcess()}, ["SSH", "WEB"], None, "SSH"),  # the only served service
        ({"SSH": InProcess(), "WEB": InProcess()}, ["SSH", "WEB"], None, None),  # several: must be named
        ({"SSH": InProcess()}, ["SSH", "WEB"], "RDP", None),
        ({"": InProcess()}, ["SSH"], None, "SSH"),  # the unnamed mapping serves the only service
        ({"": InProcess()}, ["SSH"], "", "SSH"),
        ({"SSH": InProcess()}, None, "SSH", ""),  # V1: the single mapping is served as ""
    ],
)
def test_served_service(configured: dict, ids: list | None, name: str | None, served: str | None) -> None:
    tunnel = TunnelState(Mode.SOURCE, configured)
    if ids is None:
        tunnel.session_started(V1)
    else:
        tunnel.session_started(V3)
        tunnel.receive([service_ids(*ids)])
    assert tunnel.served_service(name) == served


def test_served_service_unknown_before_service_ids() -> None:
    tunnel = TunnelState(Mode.SOURCE, {"SSH": InProcess()})
    tunnel.session_started(V3)
    assert tunnel.served_service("SSH") is None


def test_destination_refuses_source_targets() -> None:
    tunnel = TunnelState(Mode.DESTINATION, {"SSH": SourceUnixSocket("/x/s")})
    tunnel.session_started(V3)
    (fatal,) = of(tunnel.receive([service_ids("SSH")]), Fatal)
    assert isinstance(fatal.error, ConfigError) and "DestinationTarget" in str(fatal.error)
    with pytest.raises(ConfigError, match="SourcePort or SourceUnixSocket or InProcess"):
        resolve_services(Mode.SOURCE, {"SSH": DestinationTarget("h", 22)}, ["SSH"])
    assert resolve_services(Mode.SOURCE, {"SSH": SourcePort(1)}, ["SSH"]) == {"SSH": SourcePort(1)}
