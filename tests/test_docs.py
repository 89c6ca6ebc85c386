"""The documentation holds together: a short README, links that lead somewhere,
examples that import only the public API, and a library quick start that runs.

The README's library quick start is ``docs/examples/quickstart.py``, included in
the README verbatim; this test checks that it is, and runs the file (a real
emulator and two real proxies on loopback).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICKSTART = DOCS / "examples" / "quickstart.py"

MAX_README_LINES = 260
PUBLIC_MODULES = frozenset({"localproxy", "localproxy.testing", "localproxy.emulator", "localproxy.agent"})
# Pages other branches add; linked already. Remove a name once its page is merged.
PENDING_PAGES: frozenset[str] = frozenset()  # pages linked before they are written

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (.+)$", re.M)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def without_code(text: str) -> str:
    """Prose only: fenced blocks and inline code hold no links."""
    text = _FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(heading) for heading in _HEADING.findall(_FENCE.sub("", path.read_text()))}


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Relative links of ``path`` (or of ``text``, read as if at ``path``) whose file or heading does not exist."""
    problems = []
    for target in _LINK.findall(without_code(path.read_text() if text is None else text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        relative = linked.relative_to(ROOT).as_posix() if linked.is_relative_to(ROOT) else str(linked)
        if relative in PENDING_PAGES:
            continue
        if not linked.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            problems.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    return problems


def internal_imports(source: str) -> list[str]:
    """Modules of ``localproxy`` imported by ``source`` that are not the public API."""
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # snippets may await at top level
    tree = compile(source, "<docs>", "exec", flags=flags)
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name.split(".")[0] == "localproxy" and name not in PUBLIC_MODULES]


# --- the README's size --------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details into docs/"


# --- links ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files(path: Path) -> None:
    assert broken_links(path) == []


def test_a_broken_link_is_found() -> None:
    text = (
        "[ok](library.md#events) [gone](nowhere.md) [bad anchor](library.md#no-such-heading)\n"
        "[web](https://example.com/) [pending](connect.md) `[code](ignored.md)`\n"
    )
    assert broken_links(DOCS / "page.md", text) == [
        "docs/page.md: nowhere.md (no such file)",
        "docs/page.md: library.md#no-such-heading (no such heading)",
    ]


def test_anchors_follow_github() -> None:
    assert anchor("Quick start: the command line") == "quick-start-the-command-line"
    assert anchor("The device shows `DISCONNECTED`") == "the-device-shows-disconnected"


# --- imports in examples ----------------------------------------------------------------


@pytest.mark.parametrize("path", [README, DOCS / "library.md"], ids=lambda path: path.relative_to(ROOT).as_posix())
def test_python_examples_import_only_the_public_api(path: Path) -> None:
    blocks = code_blocks(path.read_text(), "python")
    assert blocks, f"{path.name} has no python example"
    for block in blocks:
        assert internal_imports(block) == [], block


def test_the_example_program_imports_only_the_public_api() -> None:
    assert internal_imports(QUICKSTART.read_text()) == []


def test_an_internal_import_is_found() -> None:
    source = (
        "from localproxy import LocalProxy\n"
        "from localproxy.emulator import Emulator\n"
        "from localproxy.config.proxy_config import ProxyConfig\n"
        "import localproxy.wire.codec\n"
        "async with LocalProxy(config) as proxy:\n"
        "    await proxy.ready\n"
    )
    assert internal_imports(source) == ["localproxy.config.proxy_config", "localproxy.wire.codec"]


def test_the_testing_page_shows_the_readme_example() -> None:
    """tests/test_testing_plugin.py runs the README's example test; docs/testing.md shows the same one."""
    readme_section = README.read_text().split("## Testing with pytest", 1)[1]
    assert code_blocks(readme_section, "python")[0] == code_blocks((DOCS / "testing.md").read_text(), "python")[0]


# --- the library quick start ------------------------------------------------------------


def test_readme_includes_the_quick_start_verbatim() -> None:
    program = QUICKSTART.read_text().rstrip("\n")
    blocks = [block.rstrip("\n") for block in code_blocks(README.read_text(), "python")]
    assert program in blocks, (
        "README.md's library quick start must be docs/examples/quickstart.py, verbatim"
    )


def test_the_quick_start_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(QUICKSTART)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "b'hello, device' aws.iot.securetunneling-3.0" in result.stdout
    assert "TunnelReady(services=('SSH',))" in result.stdout
    assert "{'SSH': 13}" in result.stdout  # the source proxy's bytes_sent
