"""``.ci/run`` runs exactly the README's test command (the rule both must keep)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Install and run the tests:\n\n```sh\n(.+)\n```", readme)
    assert match is not None, "README: the 'Install and run the tests' command is missing"
    command = match.group(1)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == command
    assert "tools/test_newest_websockets.py" in command
