"""A lean, complete package (issue 21): what a plain install needs, one version, the extras' hints.

The wheel itself is built, installed and used by ``tools/check_wheel.py`` (in ``.ci/run``);
these tests keep the rules that check relies on, in the checkout, in seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trustme

from localproxy._version import __version__

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
WITHOUT_CRYPTOGRAPHY = "import sys\nsys.modules['cryptography'] = None  # as if not installed\n"


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_a_plain_install_needs_only_what_the_proxy_needs() -> None:
    assert names(PROJECT["dependencies"]) == {"websockets"}
    assert names(EXTRAS["uvloop"]) == {"uvloop"}
    assert names(EXTRAS["emulator-tls"]) == {"cryptography"}
    assert "localproxy[emulator-tls]" in EXTRAS["testing"]
    assert "build" in names(EXTRAS["test-no-mqtt"])


def test_one_version_everywhere() -> None:
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "localproxy._version.__version__"}
    shown = subprocess.run(
        [sys.executable, "-m", "localproxy", "--version"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"localproxy-python {__version__}"


def test_the_proxy_never_imports_the_extras() -> None:
    code = (
        "import sys\n"
        "import localproxy.cli, localproxy.serve, localproxy.proxy.local_proxy, localproxy.websocket.session\n"
        "import localproxy.emulator\n"  # the plain (ws://) emulator needs no extra either
        "print(sorted(m for m in ('cryptography', 'boto3', 'botocore', 'google.protobuf', 'aiomqtt') if m in sys.modules))\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_emulator_tls_without_cryptography_names_the_extra() -> None:
    code = WITHOUT_CRYPTOGRAPHY + (
        "import asyncio\n"
        "from localproxy.emulator import Emulator\n"
        "from localproxy.errors import MissingExtraError\n"
        "try:\n"
        "    asyncio.run(Emulator(port=0, tls=True).start())\n"
        "except MissingExtraError as error:\n"
        "    print(error)\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert "pip install 'localproxy[emulator-tls]'" in result.stdout


def test_emulator_cli_tls_without_cryptography_says_what_to_install() -> None:
    code = WITHOUT_CRYPTOGRAPHY + "from localproxy.emulator.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    result = python(code, "--tls", "--port", "0")
    assert result.returncode == 1
    assert "localproxy.emulator: " in result.stderr and "pip install 'localproxy[emulator-tls]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_emulator_with_given_certificates_needs_no_cryptography(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    code = WITHOUT_CRYPTOGRAPHY + (
        "import asyncio\n"
        "from localproxy.emulator import Emulator\n"
        "async def main():\n"
        "    async with Emulator(port=0, cert=sys.argv[1], key=sys.argv[2]) as emu:\n"
        "        print(emu.data_url)\n"
        "asyncio.run(main())\n"
    )
    result = python(code, str(cert), str(key))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wss://127.0.0.1:")


def test_tls_fixture_without_cryptography_fails_with_the_hint(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(WITHOUT_CRYPTOGRAPHY)
    pytester.makepyfile(test_tls="def test_tls(tunneling_service_tls):\n    pass\n\ndef test_plain(tunneling_service):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1, errors=1)
    assert "pip install 'localproxy[emulator-tls]'" in result.stdout.str()
    assert "Traceback" not in result.stdout.str()


def test_ci_checks_the_wheel() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "python tools/check_wheel.py" in ci[-1]


def test_license_and_changelog() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    classifiers = PROJECT["classifiers"]
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    assert {"Homepage", "Changelog"} <= set(PROJECT["urls"])
