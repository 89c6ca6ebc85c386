"""The README's main job, ``python -m localproxy.emulator --demo``, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from proxyproc import ROOT


def test_demo_tunnels_data_and_explains_the_spent_token() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "localproxy.emulator", "--demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "describe-tunnel: source CONNECTED, destination CONNECTED" in out
    assert "sha256 matches." in out
    # The classic mistake is refused with its exit code and the command to run.
    assert "refused, exit code 4" in out
    assert "aws iotsecuretunneling rotate-tunnel-access-token --tunnel-id" in out
    assert "Traceback" not in out + result.stderr
