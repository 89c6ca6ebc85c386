"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml)
are kept, and break when a forbidden import is added (so the check can fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extra")

REPO = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [*LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=package_parent, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def copy_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "localproxy", tmp_path / "localproxy", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "localproxy"


def test_contracts_are_kept(tmp_path: Path) -> None:
    copy_package(tmp_path)  # the tree as committed, not whatever is installed
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "4 kept" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # the sans-I/O tunnel reaching for the websocket session: upward and I/O
        ("tunnel/core.py", "import localproxy.websocket.session", "Layers"),
        ("wire/codec.py", "import asyncio", "does no I/O"),
        ("emulator/relay.py", "import localproxy.local.adapters", "The emulator never"),
        ("ops/stats.py", "import localproxy.config.proxy_config", "Layers"),
        ("errors.py", "import localproxy.events", "Layers"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    package = copy_package(tmp_path)
    target = package / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    assert module.replace("/", ".").removesuffix(".py") in broken
