"""Run the suite once more against the newest ``websockets``, as a plain install gets it.

Why: the ``mqtt`` extra's broker (amqtt 0.12.1, its newest release) pins
``websockets==15.0.1``, so ``pip install -e '.[test]'`` tests websockets 15 while
``pip install localproxy`` gets the newest. This makes a second virtualenv with
the package and the test dependencies but not the ``mqtt`` extra
(``.[test-no-mqtt]``), checks that it got the newest websockets and no MQTT
packages, and runs pytest there; tests that need MQTT skip.

Usage (from the repository root, in the README's test command):
``python tools/test_newest_websockets.py [pytest args...]``. Exit status: pytest's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600
PYTEST_TIMEOUT = 600
# mypy is not run here: it type-checks the MQTT modules too, and typing is checked
# once, in the main run (websockets' annotations differ between releases).
PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider", "--ignore=tests/test_typing.py"]
PROBE = (
    "import json, importlib.metadata as m, importlib.util as u\n"
    "print(json.dumps({'websockets': m.version('websockets'),"
    " 'mqtt': [n for n in ('amqtt', 'aiomqtt') if u.find_spec(n)]}))\n"
)


def run(command: list[str], timeout: float, **kwargs: object) -> None:
    subprocess.run(command, check=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def main(argv: list[str]) -> int:
    started = time.monotonic()
    venv = Path(tempfile.mkdtemp(prefix="localproxy-newest-websockets-"))
    try:
        run([sys.executable, "-m", "venv", str(venv)], 120)
        python = str(venv / "bin" / "python")
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
        # --upgrade: the newest websockets even if pip's cache would have settled for less.
        run([python, "-m", "pip", "install", "-q", "--upgrade", "-e", f"{ROOT}[test-no-mqtt]", "websockets"],
            INSTALL_TIMEOUT, env=env)  # fmt: skip
        probe = json.loads(subprocess.run([python, "-c", PROBE], check=True, capture_output=True, text=True,
                                          timeout=60).stdout)  # fmt: skip
        if probe["mqtt"]:
            print(f"test_newest_websockets: {probe['mqtt']} installed without the mqtt extra", file=sys.stderr)
            return 1
        print(f"test_newest_websockets: websockets {probe['websockets']}, no MQTT packages "
              f"(set up in {time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        result = subprocess.run([python, "-m", "pytest", *PYTEST_ARGS, *argv], cwd=ROOT, timeout=PYTEST_TIMEOUT)
        print(f"test_newest_websockets: done in {time.monotonic() - started:.0f} s", flush=True)
        return result.returncode
    finally:
        shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
