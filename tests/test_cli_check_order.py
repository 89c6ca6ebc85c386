"""Drop-in fidelity: with several mistakes on one command line, the reference's first complaint.

Each case pairs two (or more) usage errors of PROTOCOL.md 5; the reference binary
(v3.3.1) reports ``first``. Its order: boost's parse errors (left to right), then
``--access-token`` required (command line, ``--config`` or environment), then
one of -r/-e, then the access and client token checks, then the -r/-e formats,
then the mode (value, -s/-d, mismatch), then mappings and addresses.
``test_reference_agrees`` runs the same table against the binary when it is present.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from localproxy.cli import main, parse_command_line
from localproxy.errors import UsageError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "localproxy"
TRY = "Try 'localproxy --help' for a list of options."
TOKEN = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "AQGAAXh" + "x" * 60}
REGION = {"AWSIOT_TUNNEL_REGION": "us-east-1"}
SHORT = "too-short"  # a client token below 32 characters

TOKEN_MISSING = "the option '--access-token' is required but missing"
ONE_OF_R_E = "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"
ONE_OF_S_D_M = "Must specify one of --source-listen-port/-s or --destination-app/-d or --mode"
ONLY_ONE_S_D = "Must specify one and only one of --source-listen-port/-s or --destination-app/-d"
MODE_WRONG = "Mode value is wrong! Allowed values are: src, dst, source, destination"
MISMATCH_DST = "-s and --mode have mismatched mode. Mode is set to destination!"
CLIENT_TOKEN = "Client token must be between 32 and 128 characters"
REGION_FORMAT = "Region must contain only lowercase letters, numbers, and hyphens"
ENDPOINT_CHARS = "Proxy endpoint contains invalid characters"

# (case id, argv, environment, the reference's first complaint)
CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("nothing-at-all", [], {}, TOKEN_MISSING),
    ("token-before-mode", ["-m", "sideways"], {}, TOKEN_MISSING),
    ("token-before-region-from-env", ["-s", "5555"], REGION, TOKEN_MISSING),
    ("token-before-both-r-and-e", ["-r", "us-east-1", "-e", "h", "-s", "5555"], {}, TOKEN_MISSING),
    ("token-before-both-s-and-d", ["-r", "us-east-1", "-s", "5555", "-d", "22"], {}, TOKEN_MISSING),
    ("unknown-option-before-token", ["-Z"], {}, "unrecognised option '-Z'"),
    ("missing-argument-before-token", ["-v"], {}, "the required argument for option '--verbose' is missing"),
    ("bad-verbose-before-token", ["-v", "abc"], {}, "the argument ('abc') for option '--verbose' is invalid"),
    ("verbose-eats-next-token", ["-v", "-Z"], {}, "the argument ('-Z') for option '--verbose' is invalid"),
    ("leftmost-parse-error", ["-Z", "-v"], {}, "unrecognised option '-Z'"),
    ("missing-token-argument", ["-t"], {}, "the required argument for option '--access-token' is missing"),
    ("env-token-then-region", [], TOKEN, ONE_OF_R_E),
    ("region-before-mode", ["-t", "x", "-m", "sideways"], {}, ONE_OF_R_E),
    ("region-before-s-and-d", ["-t", "x", "-s", "5555", "-d", "22"], {}, ONE_OF_R_E),
    ("region-before-empty-token", ["-t", "", "-r", "us-east-1", "-e", "h"], {}, ONE_OF_R_E),
    ("region-before-client-token", ["-t", "x", "-i", SHORT], {}, ONE_OF_R_E),
    ("both-r-e-before-endpoint-format", ["-t", "x", "-e", "a/b", "-r", "us-east-1"], {}, ONE_OF_R_E),
    ("empty-token-before-region-format", ["-t", "", "-r", "bad_region", "-s", "5555"], {},
     "Access token cannot be empty"),
    ("client-token-before-region-format", ["-t", "x", "-i", SHORT, "-r", "bad_region", "-s", "5555"], {},
     CLIENT_TOKEN),
    ("client-token-before-endpoint-format", ["-t", "x", "-i", SHORT, "-e", "a/b", "-s", "5555"], {}, CLIENT_TOKEN),
    ("client-token-before-mode", ["-t", "x", "-i", SHORT, "-r", "us-east-1", "-m", "sideways"], {}, CLIENT_TOKEN),
    ("client-token-before-s-and-d", ["-t", "x", "-r", "us-east-1", "-s", "5555", "-d", "22", "-i", SHORT], {},
     CLIENT_TOKEN),
    ("region-format-before-mode", ["-t", "x", "-r", "bad_region"], {}, REGION_FORMAT),
    ("endpoint-format-before-mode", ["-t", "x", "-e", "a/b", "-m", "sideways"], {}, ENDPOINT_CHARS),
    ("mode-needed", ["-t", "x", "-r", "us-east-1"], {}, ONE_OF_S_D_M),
    ("mode-needed-before-bind-address", ["-t", "x", "-r", "us-east-1", "-b", "a/b"], {}, ONE_OF_S_D_M),
    ("mode-value-before-s-and-d", ["-t", "x", "-r", "us-east-1", "-m", "sideways", "-s", "5555", "-d", "22"], {},
     MODE_WRONG),
    ("mode-value-whatever-its-place", ["-t", "x", "-r", "us-east-1", "-s", "5555", "-d", "22", "-m", "x"], {},
     MODE_WRONG),
    ("only-one-s-d-even-with-mode", ["-t", "x", "-r", "us-east-1", "-m", "source", "-s", "5555", "-d", "22"], {},
     ONLY_ONE_S_D),
    ("only-one-s-d-before-bind-address", ["-t", "x", "-r", "us-east-1", "-s", "5555", "-d", "22", "-b", "a/b"],
     {}, ONLY_ONE_S_D),
    ("mismatch", ["-t", "x", "-r", "us-east-1", "-s", "5555", "-m", "dst"], {}, MISMATCH_DST),
    ("mismatch-before-service-id", ["-r", "us-east-1", "-s", "S S=22", "-m", "dst"], TOKEN, MISMATCH_DST),
    ("client-token-before-service-id", ["-t", "x", "-r", "us-east-1", "-s", "S S=22", "-i", SHORT], {},
     CLIENT_TOKEN),
]

IDS = [case[0] for case in CASES]


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config directory from the checkout


@pytest.mark.parametrize(("case", "argv", "env", "first"), CASES, ids=IDS)
def test_first_complaint_is_the_references(case: str, argv: list[str], env: dict[str, str], first: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_command_line(argv, env)
    assert str(caught.value) == first


def test_no_arguments_prints_the_token_error_then_try(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("AWSIOT_TUNNEL_")]:
        monkeypatch.delenv(name)
    assert main([]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [TOKEN_MISSING, TRY]
    assert captured.out == ""


@pytest.mark.skipif(not os.access(REFERENCE, os.X_OK), reason="the C++ reference binary is not present")
@pytest.mark.parametrize(("case", "argv", "env", "first"), CASES, ids=IDS)
def test_reference_agrees(case: str, argv: list[str], env: dict[str, str], first: str, tmp_path: Path) -> None:
    # Every case is refused before any connection: the binary exits 1 at once.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_") and k.lower() != "https_proxy"}
    environment.update(env)
    result = subprocess.run(
        [str(REFERENCE), *argv], capture_output=True, text=True, timeout=10, env=environment, cwd=tmp_path
    )
    assert result.returncode == 1
    complaints = [line for line in result.stderr.splitlines() if "Found access token" not in line]
    complaints = [line for line in complaints if "SECURITY: Rejected input" not in line]
    assert complaints and complaints[0].endswith(first), result.stderr
