"""Fuzzing the command line with hypothesis: any argv and environment gives a parsed
command or a typed error (``UsageError`` / ``ConfigError``) with a message, never
another exception. File options point at prepared files (valid, malformed, binary,
a directory, missing); the default ``./config`` is looked for in a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.cli import parse_command_line
from localproxy.errors import ConfigError, UsageError

OPTIONS = ["-h", "--help", "-V", "--version", "-t", "--access-token", "-i", "--client-token", "-e",
           "--proxy-endpoint", "-r", "--region", "-s", "--source-listen-port", "-d", "--destination-app", "-b",
           "--local-bind-address", "-c", "--capath", "-k", "--no-ssl-host-verify", "--export-default-settings",
           "--settings-json", "--config", "-v", "--verbose", "-m", "--mode", "-y", "--destination-client-type",
           "--config-dir", "-Z", "--", "-", "--unknown"]
VALUES = ["5555", "0", "65536", "-1", "SSH=22", "SSH1=22,WEB=10.0.0.1:80", "host:22", "/tmp/sock", "us-east-1",
          "UPPER", "data.example.com:443", "ws://x", "[::1]:8443", "src", "dst", "destination", "V1", "V2", "V9",
          "a" * 40, "a" * 200, "token\x01", "", "=", ",", "SSH=", "=22", "4", "255", "256", "x" * 5000]
FILES = ["@settings", "@bad-json", "@binary", "@dir", "@missing", "@config"]
VALUE = st.one_of(st.sampled_from(VALUES), st.sampled_from(FILES), st.text(max_size=12))
# Mostly "--option value" pairs (a stray word ends parsing at once), often after a valid base.
FLAGS = {"-h", "--help", "-V", "--version", "-k", "--no-ssl-host-verify", "--", "-"}
WITH_VALUE = st.tuples(st.sampled_from(sorted(set(OPTIONS) - FLAGS)), VALUE)
PAIR = st.one_of(WITH_VALUE, WITH_VALUE, WITH_VALUE, st.tuples(st.sampled_from(OPTIONS)), st.tuples(VALUE))
BASES = st.sampled_from([(), ("-r", "us-east-1", "-s", "5555"), ("-e", "127.0.0.1:8443", "-d", "SSH=22"),
                         ("-t", "token", "-r", "us-east-1", "-d", "22", "-v", "5")])
ARGV = st.tuples(BASES, st.lists(PAIR, max_size=4)).map(lambda t: [*t[0], *(a for pair in t[1] for a in pair)])


@pytest.fixture
def cli_files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "settings.json").write_text('{"tunneling": {"proxy": {"tcp": {"max_active_connections": "9"}}}}')
    (tmp_path / "bad.json").write_text('{"tunneling": ')
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "services").write_text("SSH=22\nnot a mapping\n")
    (tmp_path / "config.ini").write_text("region = us-east-1\nsource-listen-port = 5555\nbogus = 1\n")
    return {"@settings": str(tmp_path / "settings.json"), "@bad-json": str(tmp_path / "bad.json"),
            "@binary": str(tmp_path / "binary"), "@dir": str(tmp_path / "dir"),
            "@missing": str(tmp_path / "missing"), "@config": str(tmp_path / "config.ini"), "cwd": str(tmp_path)}


ENVIRONMENTS = st.fixed_dictionaries({}, optional={
    "AWSIOT_TUNNEL_ACCESS_TOKEN": st.sampled_from(["tok", "", "x\x7f"]),
    "AWSIOT_TUNNEL_CLIENT_TOKEN": st.sampled_from(["c" * 32, "short", ""]),
    "AWSIOT_TUNNEL_ENDPOINT": st.sampled_from(["127.0.0.1:1", "bad endpoint", ""]),
    "AWSIOT_TUNNEL_REGION": st.sampled_from(["us-east-1", "Bad", ""]),
    "HTTPS_PROXY": st.sampled_from(["http://u:p@127.0.0.1:3128", "ftp://x", "http://[::1", ""]),
})


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=ARGV, environ=ENVIRONMENTS)
def test_random_command_lines_give_typed_errors_only(cli_files: dict[str, str], argv: list[str],
                                                     environ: dict[str, str]) -> None:
    arguments = [cli_files.get(arg, arg) for arg in argv]  # "@name": a prepared file
    try:
        parsed = parse_command_line(arguments, environ, cwd=cli_files["cwd"])
    except (UsageError, ConfigError) as error:
        assert str(error), "a typed error without a message"
        return
    assert parsed.show_help or parsed.show_version or parsed.export_settings_path or parsed.config is not None
