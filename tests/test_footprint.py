"""What a proxy process loads (start-up time and memory on small devices, issue 13).

Each check runs in a fresh interpreter: this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import localproxy.cli
from localproxy.ops.runtime import defer_import
first = defer_import("importlib.metadata")
again = defer_import("importlib.metadata")
localproxy.cli.defer_unused_imports()  # as main() does
import localproxy.proxy.local_proxy  # what `localproxy` imports before it connects
loaded = {name: name in sys.modules for name in ("google.protobuf", "cryptography", "zipfile", "http.client")}
deferred = type(sys.modules["importlib.metadata"]).__name__
import importlib.metadata
from importlib.metadata import version
print(json.dumps({"first": first, "again": again, "loaded": loaded, "deferred": deferred,
                  "version": version("websockets"), "after": type(sys.modules["importlib.metadata"]).__name__,
                  "error": importlib.metadata.PackageNotFoundError.__name__}))
"""


def test_run_path_loads_neither_protobuf_nor_cryptography_and_defers_metadata() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["first"] is True and result["again"] is False
    assert result["loaded"] == {"google.protobuf": False, "cryptography": False, "zipfile": False,
                                "http.client": False}
    assert result["deferred"] == "_DeferredModule"
    # The first use loads the real module, through the import statement and the stand-in alike.
    import websockets

    assert result["version"] == websockets.__version__
    assert result["after"] == "module" and result["error"] == "PackageNotFoundError"


def test_version_text_still_lists_the_packages() -> None:
    done = subprocess.run([sys.executable, "-m", "localproxy", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("localproxy-python ") and "websockets " in done.stdout
