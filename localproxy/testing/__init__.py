"""pytest plugin: the emulator and tunnel pairs as fixtures (``pytest11`` entry point).

Installed with the package, so ``pip install 'localproxy[testing]'`` makes these
available in any project, no conftest code needed. They work in ``def`` and
``async def`` tests alike (pytest-asyncio strict or auto mode): the emulator and the
pairs' proxies run on event loops of their own threads, so blocking calls in a test
(boto3, sockets, subprocesses) cannot stall them.

- ``tunneling_service``: a started emulator (ws/http) on a free loopback port
  (a :class:`~localproxy.testing.service.ThreadedEmulator`): ``.api_url``, ``.data_url``,
  ``.open_tunnel(services=[...], thing_name=None)`` (``.tunnel_id``, ``.source_token``,
  ``.destination_token``; ``await`` it too if you like) and its fault hooks
  (``.drop(tunnel_id, side)``, ``.fail_next_handshakes(n)``, ``.set_bandwidth(bytes_per_second)``,
  ``.advance_time(seconds)``, ``.wait_connected(tunnel_id, side)``...). Waits and hooks
  on live connections block in a ``def`` test and are awaited in an ``async def`` one.
- ``tunneling_service_tls``: the same over wss/https; ``.ca_pem_path`` / ``.capath`` hold its CA.
- ``tunnel_pair``: ``tunnel_pair({"SSH": local_port})`` (``await`` it in an async test)
  starts a destination and a source proxy through ``tunneling_service`` (``processes=True``:
  the ``localproxy`` command as child processes) -> ``.source_ports``, ``.tunnel_id``,
  ``.source``, ``.destination``, ``.close()``; all stopped at teardown, pass or fail.
- ``tunneling_client``: a boto3 ``iotsecuretunneling`` client for ``tunneling_service``,
  called directly in any test.

Nothing heavy is imported until a fixture is used: loading this plugin costs a
pytest run nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from localproxy.testing.pair import PairFactory
    from localproxy.testing.service import ThreadedEmulator

__all__ = ["ThreadedEmulator", "tunnel_pair", "tunneling_client", "tunneling_service", "tunneling_service_tls"]

INSTALL_HINT = "pip install 'localproxy[testing]'"


def __getattr__(name: str) -> Any:
    # Lazy: the plugin module stays light (see the module docstring).
    if name == "ThreadedEmulator":
        from localproxy.testing.service import ThreadedEmulator

        return ThreadedEmulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pytest.fixture
def tunneling_service() -> Iterator[ThreadedEmulator]:
    """A started emulator of the tunneling service (ws:// and http://) on a free loopback port, on its own thread."""
    from localproxy.testing.service import ThreadedEmulator

    with ThreadedEmulator(host="127.0.0.1", port=0) as service:
        yield service


@pytest.fixture
def tunneling_service_tls() -> Iterator[ThreadedEmulator]:
    """A started emulator over wss:// and https://, with a CA of its own (``.ca_pem_path``, ``.capath``)."""
    from localproxy.errors import MissingExtraError
    from localproxy.testing.service import ThreadedEmulator

    service = ThreadedEmulator(host="127.0.0.1", port=0, tls=True)
    try:
        service.start()
    except MissingExtraError as error:
        pytest.fail(f"the tunneling_service_tls fixture: {error}", pytrace=False)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def tunnel_pair(tunneling_service: ThreadedEmulator) -> Iterator[PairFactory]:
    """``tunnel_pair({"SSH": local_port, ...}, processes=False)`` -> a running ``TunnelPair`` (awaitable in async tests)."""
    from localproxy.testing.pair import PairFactory

    factory = PairFactory(tunneling_service)
    try:
        yield factory
    finally:
        factory.close_all()


@pytest.fixture
def tunneling_client(tunneling_service: ThreadedEmulator) -> Any:
    """A boto3 ``iotsecuretunneling`` client for ``tunneling_service`` (needs boto3)."""
    try:
        from localproxy.testing.aws import api_for
    except ImportError as error:
        problem = str(error)
    else:
        return api_for(tunneling_service)
    pytest.fail(f"the tunneling_client fixture needs boto3 ({problem}): {INSTALL_HINT}", pytrace=False)
