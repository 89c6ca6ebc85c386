"""docs/testing-fixtures-sync.md's examples run as written (through pytester, in a fresh pytest)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing-fixtures-sync.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def run(pytester: pytest.Pytester, mode: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", f"asyncio_mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function",
        timeout=90,
    )  # fmt: skip


def test_the_def_examples_pass(pytester: pytest.Pytester) -> None:
    sync_blocks = [block for block in blocks() if re.search(r"^def test_", block, re.MULTILINE)]
    assert len(sync_blocks) == 3  # the banner, a binary of your own, the fault hooks
    pytester.makepyfile(test_doc_sync="\n\n".join(sync_blocks))
    run(pytester, "strict").assert_outcomes(passed=3)


def test_the_async_example_passes_in_strict_mode(pytester: pytest.Pytester) -> None:
    (async_block,) = [block for block in blocks() if "async def test_" in block]
    pytester.makepyfile(test_doc_async=async_block)
    run(pytester, "strict").assert_outcomes(passed=1)


def test_the_outside_pytest_example_runs(tmp_path: Path) -> None:
    (script,) = [block for block in blocks() if "with ThreadedEmulator" in block]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ws://127.0.0.1:")
