"""What a proxy process loads (start-up time and memory on small devices, issue 13).

Each check runs in a fresh interpreter: this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

from localproxy.errors import ExitCode

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


# --- the event loop and the allocator: loaded when used (issue 21) ----------------------------

LOOP_PROBE = """
import json, os, sys
if sys.argv[1] == "missing":
    sys.modules["uvloop"] = None  # as in a plain install
    os.environ["LOCALPROXY_EVENT_LOOP"] = sys.argv[2]
else:
    os.environ["LOCALPROXY_EVENT_LOOP"] = sys.argv[1]
from localproxy.errors import LocalProxyError
from localproxy.ops.runtime import event_loop_factory
try:
    factory = event_loop_factory()
except LocalProxyError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error), "code": int(error.exit_code)}))
else:
    print(json.dumps({"factory": None if factory is None else f"{factory.__module__}.{factory.__name__}"}))
"""


def loop_choice(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", LOOP_PROBE, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_event_loop_follows_the_variable() -> None:
    import pytest

    pytest.importorskip("uvloop")
    assert loop_choice("auto") == {"factory": "uvloop.new_event_loop"}
    assert loop_choice("") == {"factory": "uvloop.new_event_loop"}
    assert loop_choice("UVLOOP") == {"factory": "uvloop.new_event_loop"}
    assert loop_choice("asyncio") == {"factory": None}
    bad = loop_choice("tokio")
    assert bad["error"] == "UsageError" and "LOCALPROXY_EVENT_LOOP='tokio'" in str(bad["message"])
    assert "auto, uvloop, asyncio" in str(bad["message"]) and bad["code"] == ExitCode.USAGE


def test_without_uvloop_auto_runs_asyncio_and_insisting_names_the_extra() -> None:
    assert loop_choice("missing", "auto") == {"factory": None}
    insisted = loop_choice("missing", "uvloop")
    assert insisted["error"] == "MissingExtraError" and "pip install 'localproxy[uvloop]'" in str(insisted["message"])


def mapped(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped in ``pid`` (a loaded extension)."""
    with open(f"/proc/{pid}/maps") as maps:
        return any(fragment in line for line in maps)


async def test_idle_proxies_load_neither_ctypes_nor_the_other_loop(emulator: object) -> None:
    """Connected and idle: no ``_ctypes`` (the allocator is tuned when the first stream
    starts) and, with LOCALPROXY_EVENT_LOOP=asyncio, no uvloop; then a connection flows
    and both proxies have tuned their allocator."""
    import asyncio

    import pytest

    from tests.proxyproc import LISTENING, ProxyProcess, echo_app

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/PID/maps")
    from localproxy.ops.runtime import tune_allocator

    if not tune_allocator():
        pytest.skip("not glibc: nothing to tune")
    tunnel = emulator.open_tunnel(services=["SSH"])  # type: ignore[attr-defined]
    server, app_port = await echo_app()
    loop_env = {"LOCALPROXY_EVENT_LOOP": "asyncio"}
    destination = await ProxyProcess.start(
        "-e", emulator.data_url, "-d", f"SSH=127.0.0.1:{app_port}",  # type: ignore[attr-defined]
        token=tunnel.destination_token, extra_env=loop_env,
    )
    source = await ProxyProcess.start(
        "-e", emulator.data_url, "-b", "127.0.0.1", "-s", "SSH=0",  # type: ignore[attr-defined]
        token=tunnel.source_token,
    )
    try:
        port = int((await source.wait_for_line(LISTENING)).group(1))
        await destination.wait_for_line("Successfully established websocket connection")
        await emulator.wait_connected(tunnel.tunnel_id, "destination")  # type: ignore[attr-defined]
        for child in (source, destination):
            assert not mapped(child.pid, "_ctypes"), child.text
        assert not mapped(destination.pid, "uvloop")
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        else:  # LOCALPROXY_EVENT_LOOP unset: "auto" runs uvloop when it is installed
            assert mapped(source.pid, "uvloop")

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 15) == b"ping"
        writer.close()
        for child in (source, destination):
            assert mapped(child.pid, "_ctypes"), child.text
    finally:
        for child in (source, destination):
            assert await asyncio.wait_for(child.stop(), 15) == 0
        server.close()


ANSWERED_PROBE = """
import json, os, sys
import localproxy.cli
localproxy.cli.defer_unused_imports()  # as main() does
import localproxy.serve, localproxy.proxy.local_proxy, localproxy.config.command_line
import uuid  # websockets imports it; it calls platform.system() at import
real = {name: type(sys.modules.get(name)).__name__ == "module"
        for name in ("platform", "hashlib", "_hashlib", "secrets", "hmac")}
import hashlib, platform, secrets
answered = {"sha1": hashlib.sha1(b"abc").hexdigest(), "token": [len(secrets.token_bytes(4)), len(secrets.token_bytes())],
            "system": platform.system(), "still_deferred": type(sys.modules["hashlib"]).__name__}
# Anything not answered loads the real module, through the stand-in too.
loaded = {"sha256": hashlib.sha256(b"abc").hexdigest(), "machine": platform.machine() == os.uname().machine,
          "hex": len(secrets.token_hex(3)), "hashlib": type(sys.modules["hashlib"]).__name__,
          "sha1_now": hashlib.sha1.__name__}
print(json.dumps({"real": real, "answered": answered, "loaded": loaded, "uname": os.uname().sysname}))
"""


def test_the_run_path_answers_what_websockets_and_uuid_use_without_loading_the_modules() -> None:
    done = subprocess.run([sys.executable, "-c", ANSWERED_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["real"] == {"platform": False, "hashlib": False, "_hashlib": False, "secrets": False, "hmac": False}
    assert result["answered"] == {"sha1": "a9993e364706816aba3e25717850c26c9cd0d89d", "token": [4, 32],
                                  "system": result["uname"], "still_deferred": "_DeferredModule"}
    assert result["loaded"] == {"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                                "machine": True, "hex": 6, "hashlib": "module",
                                "sha1_now": result["loaded"]["sha1_now"]}
    assert result["loaded"]["sha1_now"] in ("openssl_sha1", "sha1")


# --- the collector: paused while the entry point imports (issue 21) ---------------------------

COLLECTOR_PROBE = """
import gc, json, sys
import localproxy.cli
import localproxy.ops.runtime as runtime
seen = {}
resume = sys.argv[1] == "resume"
def fake_main(argv=None):
    seen["during"] = gc.isenabled()
    seen["flag"] = runtime.collector_paused
    if resume:
        runtime.resume_collector()
        seen["after_resume"] = gc.isenabled()
        runtime.resume_collector()  # once only
    return 3
localproxy.cli.main = fake_main
import localproxy.__main__ as entry
code = entry.main()
print(json.dumps({**seen, "code": code, "end": gc.isenabled(), "frozen": gc.get_freeze_count() > 0,
                  "flag_end": runtime.collector_paused}))
"""


def collector_probe(mode: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", COLLECTOR_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_entry_point_pauses_the_collector_until_the_cli_resumes_it() -> None:
    assert collector_probe("resume") == {"during": False, "flag": True, "after_resume": True, "code": 3,
                                         "end": True, "frozen": True, "flag_end": False}
    # A path that never resumes it (--help, a usage error) gets it back on the way out.
    assert collector_probe("no") == {"during": False, "flag": True, "code": 3, "end": True, "frozen": True,
                                     "flag_end": False}


def test_the_proxy_runs_with_the_collector(monkeypatch: object) -> None:
    """cli.main resumes it once the imports are done, before the loop runs."""
    import gc

    import pytest

    import localproxy.cli as cli
    from localproxy.ops import runtime

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    seen: dict[str, bool] = {}

    def fake_run_program(coroutine: object, **kwargs: object) -> int:
        seen["enabled"] = gc.isenabled()
        coroutine.close()  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(cli, "run_program", fake_run_program)
    monkeypatch.setenv("AWSIOT_TUNNEL_ACCESS_TOKEN", "a-token")
    was_enabled = gc.isenabled()
    gc.disable()
    monkeypatch.setattr(runtime, "collector_paused", True)
    try:
        assert cli.main(["-e", "ws://127.0.0.1:9", "-s", "5555"]) == 0
        assert seen == {"enabled": True} and runtime.collector_paused is False
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
