"""Build the sdist and the wheel, install the wheel into a fresh virtualenv, and use it from there.

What a user gets from ``pip install localproxy``, checked outside the checkout (a temp
dir, so nothing is imported from the source tree):

1. ``python -m build`` (the sdist, then the wheel built from it); every file tracked
   under ``localproxy/`` (``py.typed``, the generated ``wire/_pb`` modules and stubs...)
   is in the wheel.
2. The wheel without extras in a new virtualenv: ``localproxy --version`` matches the
   package metadata (and ``localproxy/_version.py``), ``python -m localproxy.emulator
   --demo`` passes, ``localproxy-agent --help`` works (running it says to install the
   ``mqtt`` extra), ``--tls`` without the
   ``emulator-tls`` extra fails with a message naming it, so does
   ``LOCALPROXY_EVENT_LOOP=uvloop`` without the ``uvloop`` extra (the demo ran on asyncio's
   own loop), and ``cryptography``, ``protobuf``, ``boto3`` and ``uvloop`` were not installed.
3. Then the ``testing`` extra: ``pytest --fixtures`` lists the plugin's fixtures and a
   ``def`` test using them (TLS included) passes.

Usage (from anywhere; in the README's test command): ``python tools/check_wheel.py``.
pip's cache makes a second run fast; the only network used is the package index.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds, per step (an install with a cold cache)
LEAN = ("cryptography", "protobuf", "boto3", "uvloop")  # never in a plain install
FIXTURES = ("tunneling_service", "tunneling_service_tls", "tunnel_pair", "tunneling_client")
SMOKE_TEST = '''
def test_wheel_fixtures(tunneling_service, tunneling_service_tls, tunnel_pair, tunneling_client):
    pair = tunnel_pair({"SSH": tunneling_service_tls.port}, service=tunneling_service_tls)
    assert pair.source_ports["SSH"] > 0
    assert tunneling_service_tls.describe(pair.tunnel_id)["status"] == "OPEN"
    opened = tunneling_service.open_tunnel(services=["SSH"])
    assert tunneling_client.describe_tunnel(tunnelId=opened.tunnel_id)["tunnel"]["status"] == "OPEN"
    pair.close()
'''


class CheckFailed(Exception):
    pass


def run(command: list[str], cwd: Path, env: dict[str, str], expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect is not None and result.returncode != expect:
        raise CheckFailed(
            f"{' '.join(command)} exited {result.returncode} (expected {expect}):\n{result.stdout}{result.stderr}"
        )
    return result


def step(name: str, started: float) -> None:
    print(f"check_wheel: {name} ({time.monotonic() - started:.1f} s)", flush=True)


def tracked_package_files() -> set[str]:
    """Files under localproxy/ that git tracks (or, outside git, all but caches)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "localproxy"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for p in (ROOT / "localproxy").rglob("*") if p.is_file()]
    return {name for name in listed if "__pycache__" not in name and not name.endswith(".pyc")}


def source_version() -> str:
    match = re.search(r'__version__ = "([^"]+)"', (ROOT / "localproxy" / "_version.py").read_text())
    if match is None:
        raise CheckFailed("localproxy/_version.py holds no __version__")
    return match.group(1)


def check(work: Path) -> None:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    dist = work / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)], work, env)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise CheckFailed(f"expected one wheel and one sdist, got {[p.name for p in dist.iterdir()]}")
    wheel = wheels[0]
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(tracked_package_files() - in_wheel)
    if missing:
        raise CheckFailed(f"the wheel lacks files of the package: {missing}")
    step(f"built {sdists[0].name} and {wheel.name} ({len(in_wheel)} files, none missing)", started)

    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], work, env)
    bin_dir = venv / "bin"
    python = str(bin_dir / "python")
    run([python, "-m", "pip", "install", "-q", str(wheel)], work, env)
    step("installed the wheel without extras", started)

    installed = json.loads(run([python, "-m", "pip", "list", "--format", "json"], work, env).stdout)
    names = {entry["name"].lower() for entry in installed}
    unwanted = sorted(name for name in LEAN if name in names)
    if unwanted:
        raise CheckFailed(f"a plain install pulled {unwanted}: {sorted(names)}")

    metadata = run([python, "-c", "import importlib.metadata as m; print(m.version('localproxy'))"], work, env)
    version = metadata.stdout.strip()
    shown = run([str(bin_dir / "localproxy"), "--version"], work, env).stdout.splitlines()[0]
    if shown != f"localproxy-python {version}" or version != source_version():
        raise CheckFailed(f"localproxy --version says {shown!r}; metadata {version}, _version.py {source_version()}")
    run([python, "-m", "localproxy.emulator", "--demo"], work, env)
    agent_help = run([str(bin_dir / "localproxy-agent"), "--help"], work, env).stdout
    if "--thing-name" not in agent_help:
        raise CheckFailed(f"localproxy-agent --help:\n{agent_help}")
    agent = [str(bin_dir / "localproxy-agent"), "--thing-name", "t", "--mqtt-endpoint", "mqtt://127.0.0.1:1", "--no-tls",
             "--service", "SSH=22", "--endpoint", "ws://127.0.0.1:1"]  # fmt: skip
    no_mqtt = run(agent, work, env, expect=1)
    if "localproxy[mqtt]" not in no_mqtt.stderr + no_mqtt.stdout or "Traceback" in no_mqtt.stderr:
        raise CheckFailed(f"the agent without the mqtt extra:\n{no_mqtt.stdout}{no_mqtt.stderr}")
    tls = run([python, "-m", "localproxy.emulator", "--tls", "--port", "0"], work, env, expect=None)
    if tls.returncode == 0 or "localproxy[emulator-tls]" not in tls.stderr or "Traceback" in tls.stderr:
        raise CheckFailed(f"--tls without the emulator-tls extra (exit {tls.returncode}):\n{tls.stderr}")
    uv = run([python, "-m", "localproxy.emulator", "--port", "0"], work, {**env, "LOCALPROXY_EVENT_LOOP": "uvloop"}, expect=None)
    if uv.returncode == 0 or "localproxy[uvloop]" not in uv.stderr or "Traceback" in uv.stderr:
        raise CheckFailed(f"LOCALPROXY_EVENT_LOOP=uvloop without the uvloop extra (exit {uv.returncode}):\n{uv.stderr}")
    step(f"localproxy {version}: --version, the emulator demo, the agent's --help and mqtt hint, --tls's and uvloop's hints; no {'/'.join(LEAN)}", started)

    run([python, "-m", "pip", "install", "-q", f"{wheel}[testing]"], work, env)
    tests = work / "tests"
    tests.mkdir()
    (tests / "test_wheel.py").write_text(SMOKE_TEST)
    fixtures = run([python, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"], tests, env).stdout
    absent = [name for name in FIXTURES if not re.search(rf"^{name}\b", fixtures, re.MULTILINE)]
    if absent or "localproxy" not in fixtures:
        raise CheckFailed(f"pytest --fixtures does not list {absent}:\n{fixtures}")
    run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_wheel.py"], tests, env)
    step(f"the testing extra: pytest --fixtures lists {', '.join(FIXTURES)}; a def test using them passed", started)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="localproxy-check-wheel-"))
    try:
        check(work)
    except (CheckFailed, subprocess.TimeoutExpired) as error:
        print(f"check_wheel: FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("check_wheel: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
