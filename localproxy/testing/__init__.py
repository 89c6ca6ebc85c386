"""pytest plugin: the emulator and tunnel pairs as fixtures (``pytest11`` entry point).

Installed with the package, so ``pip install 'localproxy[testing]'`` makes these
available in any project, no conftest code needed:

- ``tunneling_service``: a started emulator (ws/http) on a free loopback port:
  ``.api_url``, ``.data_url``, ``.open_tunnel(services=[...], thing_name=None)``
  (``.tunnel_id``, ``.source_token``, ``.destination_token``) and its fault hooks
  (``await .drop(tunnel_id, side)``, ``.fail_next_handshakes(n)``,
  ``.set_bandwidth(bytes_per_second)``, ``.advance_time(seconds)``...).
- ``tunneling_service_tls``: the same over wss/https; ``.ca_pem_path`` / ``.capath`` hold its CA.
- ``tunnel_pair``: ``await tunnel_pair({"SSH": local_port})`` starts a destination and a
  source proxy through ``tunneling_service`` (``processes=True``: the ``localproxy``
  command as child processes) -> ``.source_ports``, ``.tunnel_id``, ``.source``,
  ``.destination``, ``await .close()``; all stopped at teardown, pass or fail.
- ``tunneling_client``: a boto3 ``iotsecuretunneling`` client for ``tunneling_service``
  (blocking: call it with ``await asyncio.to_thread(...)``).

The async fixtures are ``pytest_asyncio`` fixtures, so they work in its strict
mode (mark tests ``@pytest.mark.asyncio``) and auto mode. Nothing heavy is imported
until a fixture is used: loading this plugin costs a pytest run nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from localproxy.emulator import Emulator
    from localproxy.testing.pair import PairFactory

__all__ = ["tunnel_pair", "tunneling_client", "tunneling_service", "tunneling_service_tls"]

INSTALL_HINT = "pip install 'localproxy[testing]'"

F = TypeVar("F", bound=Callable[..., Any])


def _async_fixture(function: F) -> F:
    """A pytest-asyncio fixture; without pytest-asyncio, one that says what to install."""
    try:
        import pytest_asyncio
    except ImportError:
        name = function.__name__

        def missing() -> None:
            pytest.fail(f"the {name} fixture needs pytest-asyncio: {INSTALL_HINT}", pytrace=False)

        missing.__name__ = name
        return cast(F, pytest.fixture(name=name)(missing))
    return cast(F, pytest_asyncio.fixture(function))


@_async_fixture
async def tunneling_service() -> AsyncIterator[Emulator]:
    """A started emulator of the tunneling service (ws:// and http://) on a free loopback port."""
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0) as service:
        yield service


@_async_fixture
async def tunneling_service_tls() -> AsyncIterator[Emulator]:
    """A started emulator over wss:// and https://, with a CA of its own (``.ca_pem_path``, ``.capath``)."""
    from localproxy.emulator import Emulator

    async with Emulator(host="127.0.0.1", port=0, tls=True) as service:
        yield service


@_async_fixture
async def tunnel_pair(tunneling_service: Emulator) -> AsyncIterator[PairFactory]:
    """``await tunnel_pair({"SSH": local_port, ...}, processes=False)`` -> a running ``TunnelPair``."""
    from localproxy.testing.pair import PairFactory

    factory = PairFactory(tunneling_service)
    try:
        yield factory
    finally:
        await factory.close_all()


@pytest.fixture
def tunneling_client(tunneling_service: Emulator) -> Any:
    """A boto3 ``iotsecuretunneling`` client for ``tunneling_service`` (needs boto3)."""
    try:
        from localproxy.testing.aws import api_for
    except ImportError as error:
        problem = str(error)
    else:
        return api_for(tunneling_service)
    pytest.fail(f"the tunneling_client fixture needs boto3 ({problem}): {INSTALL_HINT}", pytrace=False)
