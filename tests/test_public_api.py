"""The public API: what ``localproxy`` exports, lazily, and that importing it stays cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys

import localproxy


def test_all_names_resolve_to_their_defining_objects() -> None:
    assert set(localproxy.__all__) == set(localproxy._EXPORTS) | {"__version__"}
    assert len(localproxy.__all__) == len(set(localproxy.__all__))
    for name, module in localproxy._EXPORTS.items():
        assert getattr(localproxy, name) is getattr(importlib.import_module(module), name)
    from localproxy.errors import LocalProxyError
    from localproxy.proxy.local_proxy import LocalProxy

    assert localproxy.LocalProxy is LocalProxy and localproxy.LocalProxyError is LocalProxyError


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        localproxy.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_star_import_and_a_cheap_plain_import() -> None:
    code = (
        "import sys, localproxy\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('localproxy'))\n"
        "assert loaded == ['localproxy', 'localproxy._version'], loaded\n"
        "assert 'websockets' not in sys.modules and 'asyncio' not in sys.modules\n"
        "ns = {}\n"
        "exec('from localproxy import *', ns)\n"
        "assert 'LocalProxy' in ns and 'Mode' in ns and 'MissingExtraError' in ns\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
