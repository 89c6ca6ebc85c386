"""The command line: reference option syntax, exact error texts, precedence, mappings."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from localproxy.cli import main, parse_command_line
from localproxy.config.command_line import INSECURE_WARNING, ParsedCommand
from localproxy.errors import ConfigError, UsageError
from localproxy.ops.logs import REDACTED, redact
from localproxy.types import (
    V1_SERVICE,
    DestinationTarget,
    Mode,
    ServiceEndpoint,
    SourcePort,
)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "AQGAAXh" + "x" * 60  # shaped like a CAT, long enough to be unambiguous
ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}
TRY = "Try 'localproxy --help' for a list of options."


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default ./config directory is looked up in the current directory.
    monkeypatch.chdir(tmp_path)


def parse(*argv: str, env: dict[str, str] | None = None) -> ParsedCommand:
    return parse_command_line(list(argv), ENV if env is None else env)


def usage_error(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(UsageError) as caught:
        parse(*argv, env=env)
    return str(caught.value)


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_") and k.lower() != "https_proxy"}
    environment.update(env or {})
    environment["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "localproxy", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO,
    )


# --- exact reference error texts -------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "env", "reason"),
    [
        (["-Z"], ENV, "unrecognised option '-Z'"),
        (["--foo"], ENV, "unrecognised option '--foo'"),
        (["--foo=bar"], ENV, "unrecognised option '--foo=bar'"),
        (["-kZ"], ENV, "unrecognised option '-kZ'"),
        (["-v"], ENV, "the required argument for option '--verbose' is missing"),
        (["--verbose"], ENV, "the required argument for option '--verbose' is missing"),
        (["-t", "-r", "us-east-1"], {}, "the required argument for option '--access-token' is missing"),
        (["-r", "us-east-1", "-s", "5555"], {}, "the option '--access-token' is required but missing"),
        ([], ENV, "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"),
        (["-r", "us-east-1", "-e", "h:443", "-s", "1"], ENV,
         "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"),
        (["-r", "us-east-1"], ENV, "Must specify one of --source-listen-port/-s or --destination-app/-d or --mode"),
        (["-r", "us-east-1", "-s", "5555", "-d", "22"], ENV,
         "Must specify one and only one of --source-listen-port/-s or --destination-app/-d"),
        (["-r", "us-east-1", "-m", "sideways"], ENV,
         "Mode value is wrong! Allowed values are: src, dst, source, destination"),
        (["-r", "us-east-1", "-s", "5555", "-m", "dst"], ENV,
         "-s and --mode have mismatched mode. Mode is set to destination!"),
        (["-r", "us-east-1", "-d", "22", "--mode", "source"], ENV,
         "-d and --mode have mismatched mode. Mode is set to source!"),
        (["-r", "us-east-1", "--region", "us-west-2"], ENV, "option '--region' cannot be specified more than once"),
        (["-k", "-k"], ENV, "option '--no-ssl-host-verify' cannot be specified more than once"),
        (["--no-ssl-host-verify=yes"], ENV, "option '--no-ssl-host-verify' does not take any arguments"),
        (["--region="], ENV, "the argument for option '--region' should follow immediately after the equal sign"),
        (["--con", "x"], ENV, "option '--con' is ambiguous and matches '--config', and '--config-dir'"),
        (["stray"], ENV, "too many positional options have been specified on the command line"),
        (["--", "-r"], ENV, "too many positional options have been specified on the command line"),
        (["-v", "abc"], ENV, "the argument ('abc') for option '--verbose' is invalid"),
        (["-v", "256"], ENV, "the argument ('256') for option '--verbose' is invalid"),
    ],
)
def test_usage_error_texts(argv: list[str], env: dict[str, str], reason: str) -> None:
    assert usage_error(*argv, env=env) == reason


def test_usage_error_process_prints_reason_and_try_line() -> None:
    result = run_cli("-Z")
    assert result.returncode == 1
    assert result.stderr == f"unrecognised option '-Z'\n{TRY}\n"
    assert result.stdout == ""


def test_mode_mismatch_process() -> None:
    result = run_cli("-r", "us-east-1", "-s", "5555", "-m", "dst", env=ENV)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["-s and --mode have mismatched mode. Mode is set to destination!", TRY]


def test_missing_token_process() -> None:
    result = run_cli("-r", "us-east-1", "-s", "5555")
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["the option '--access-token' is required but missing", TRY]


def test_help_and_version_exit_0() -> None:
    shown = run_cli("-h")
    assert shown.returncode == 0
    assert "-t [ --access-token ] arg" in shown.stdout and "--config-dir arg" in shown.stdout
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("localproxy-python 0.1.0\npython 3.")
    assert "websockets" in version.stdout


def test_help_and_version_skip_other_checks() -> None:
    assert parse("-h", env={}).show_help
    assert parse("-V", "-s", "1", "-d", "2", env={}).show_version


def test_main_in_process_returns_1_with_try_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-r", "us-east-1", "-m", "nope"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == TRY


def test_main_file_problem_exits_2_without_try_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "missing.ini"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Cannot read config file missing.ini") and TRY not in err


# --- syntax forms ------------------------------------------------------------------

def test_value_forms_are_equivalent() -> None:
    forms = [
        ["-r", "us-east-1", "-s", "5555"],
        ["--region", "us-east-1", "--source-listen-port", "5555"],
        ["--region=us-east-1", "--source-listen-port=5555"],
        ["-rus-east-1", "-s5555"],
        ["--reg", "us-east-1", "--source", "5555"],  # unique prefixes, as boost guesses
    ]
    configs = [parse(*argv).config for argv in forms]
    assert all(config == configs[0] for config in configs)
    assert configs[0].endpoint == ServiceEndpoint("data.tunneling.iot.us-east-1.amazonaws.com", 443, True)
    assert configs[0].region == "us-east-1"


def test_grouped_flags_and_sticky_value() -> None:
    parsed = parse("-kv5", "-r", "us-east-1", "-s", "1")
    assert parsed.verbosity == 5
    assert parsed.config.verify_ssl is False
    assert (logging.WARNING, INSECURE_WARNING) in parsed.log_messages
    assert "intercepted" in INSECURE_WARNING and "verification is disabled" in INSECURE_WARNING


def test_verbosity_default_and_range() -> None:
    assert parse("-r", "us-east-1", "-s", "1").verbosity == 4
    assert parse("-r", "us-east-1", "-s", "1", "-v", "255").verbosity == 255
    assert parse("-r", "us-east-1", "-s", "1", "-v", "0").verbosity == 0


# --- input checks ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["-t", ""], "Access token cannot be empty"),
        (["-t", "a" * 4097], "Access token exceeds maximum allowed length"),
        (["-t", "abc\x01def-secret"], "Access token contains invalid control characters"),
        (["-i", "short-secret"], "Client token must be between 32 and 128 characters"),
        (["-i", "c" * 129], "Client token must be between 32 and 128 characters"),
        (["-i", "c" * 31 + "_"], "Client token must contain only letters, digits and hyphens (^[a-zA-Z0-9-]{32,128}$)"),
    ],
)
def test_token_checks_never_echo_the_token(argv: list[str], reason: str) -> None:
    message = usage_error("-r", "us-east-1", "-s", "1", *argv)
    assert message == reason
    assert argv[1] == "" or argv[1] not in message


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["-r", "US-EAST-1"], "Region must contain only lowercase letters, numbers, and hyphens"),
        (["-e", "host name"], "Proxy endpoint contains invalid characters"),
        (["-e", "wss://host/path"], "Proxy endpoint contains invalid characters"),
        (["-e", "http://host"], "Invalid proxy endpoint 'http://host': Unsupported proxy endpoint scheme 'http': use wss:// or ws://"),
        (["-e", "host:99999"], "Invalid proxy endpoint 'host:99999': Invalid port '99999'"),
        (["-r", "us-east-1", "-b", "local host"], "Bind address contains invalid characters"),
        (["-r", "us-east-1", "-c", "/no/such/ca/dir"], "CA path '/no/such/ca/dir' (--capath) does not exist"),
        (["-r", "us-east-1", "-y", "V9"], "Invalid --destination-client-type value 'V9': allowed values are V1, V2 (V3 is the default)"),
        (["-r", "us-east-1", "--tunnel-id", "bad id"], "Tunnel id must be 1..128 characters of letters, digits and _-+=:"),
        (["-r", "us-east-1", "--rotate-on-reject"], "--rotate-on-reject needs --tunnel-id (the tunnel whose token to rotate)"),
        (["-r", "us-east-1", "--max-rotations", "x"], "the argument ('x') for option '--max-rotations' is invalid"),
    ],
)
def test_value_checks(argv: list[str], reason: str) -> None:
    assert usage_error("-s", "1", *argv) == reason


def test_endpoint_forms() -> None:
    def endpoint(text: str) -> ServiceEndpoint:
        return parse("-e", text, "-s", "1").config.endpoint

    assert endpoint("data.example.com") == ServiceEndpoint("data.example.com", 443, True)
    assert endpoint("data.example.com:8443") == ServiceEndpoint("data.example.com", 8443, True)
    assert endpoint("wss://127.0.0.1:9000") == ServiceEndpoint("127.0.0.1", 9000, True)
    assert endpoint("ws://127.0.0.1:9000/") == ServiceEndpoint("127.0.0.1", 9000, False)
    assert endpoint("ws://[::1]:9000") == ServiceEndpoint("::1", 9000, False)
    assert parse("-e", "h", "-s", "1").config.region is None


def test_region_endpoint_and_cn_override() -> None:
    config = parse("-r", "cn-north-1", "-s", "1").config
    assert config.endpoint == ServiceEndpoint("data.tunneling.iot.cn-north-1.amazonaws.com.cn", 443, True)


def test_destination_client_type_and_extras() -> None:
    config = parse(
        "-r", "us-east-1", "-s", "1", "-y", "v1", "--client-token-file", "ct.txt",
        "--tunnel-id", "abc-123", "--rotate-on-reject", "--max-rotations", "5",
    ).config
    assert config.destination_client_type == "V1"
    assert (config.client_token_file, config.tunnel_id, config.rotate_on_reject, config.max_rotations) == (
        "ct.txt", "abc-123", True, 5,
    )
    assert parse("-r", "us-east-1", "-s", "1", "-y", "V3").config.destination_client_type is None
    assert parse("-r", "us-east-1", "-s", "1").config.max_rotations == 3
    ignored = parse("-r", "us-east-1", "-d", "22", "-y", "V2")
    assert ignored.config.destination_client_type is None
    assert any("only applies in source mode" in m for _, m in ignored.log_messages)


# --- mappings ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5555", {V1_SERVICE: SourcePort(5555)}),
        ("0", {V1_SERVICE: SourcePort(0)}),  # beyond the reference: pick a free port
        ("SSH1=5555,SSH2=6666", {"SSH1": SourcePort(5555), "SSH2": SourcePort(6666)}),
        (" SSH1 = 5555 ,, WEB_2=0 ", {"SSH1": SourcePort(5555), "WEB_2": SourcePort(0)}),
    ],
)
def test_source_mappings(value: str, expected: dict) -> None:
    config = parse("-r", "us-east-1", "-s", value).config
    assert config.mode is Mode.SOURCE
    assert dict(config.services) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("22", {V1_SERVICE: DestinationTarget(host="localhost", port=22)}),
        ("host.example:22", {V1_SERVICE: DestinationTarget(host="host.example", port=22)}),
        ("[::1]:22", {V1_SERVICE: DestinationTarget(host="::1", port=22)}),
        ("SSH1=22,WEB=10.0.0.1:80", {"SSH1": DestinationTarget(host="localhost", port=22),
                                     "WEB": DestinationTarget(host="10.0.0.1", port=80)}),
        ("/run/app.sock", {V1_SERVICE: DestinationTarget(unix_path="/run/app.sock")}),
        ("WEB=/tmp/x.sock,SSH=22", {"WEB": DestinationTarget(unix_path="/tmp/x.sock"),
                                    "SSH": DestinationTarget(host="localhost", port=22)}),
        ("./rel=1.sock", {V1_SERVICE: DestinationTarget(unix_path="./rel=1.sock")}),
    ],
)
def test_destination_mappings(value: str, expected: dict) -> None:
    config = parse("-r", "us-east-1", "-d", value).config
    assert config.mode is Mode.DESTINATION
    assert dict(config.services) == expected


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("-s", "55a5", "Invalid --source-listen-port mapping '55a5': Port must contain only digits"),
        ("-s", "70000", "Invalid --source-listen-port mapping '70000': Port must be between 0 and 65535"),
        ("-s", "host:22", "Invalid --source-listen-port mapping 'host:22': Port must contain only digits"),
        ("-d", "0", "Invalid --destination-app mapping '0': Port must be between 1 and 65535"),
        ("-d", "::1:22", "Invalid --destination-app mapping '::1:22': An IPv6 endpoint must be written [address]:port"),
        ("-d", "host", "Invalid --destination-app mapping 'host': Endpoint needs a port: port, host:port or [address]:port"),
        ("-d", "SSH=h!:22", "Invalid --destination-app mapping 'SSH=h!:22': Endpoint contains invalid characters"),
        ("-s", "5555,6666", "Wrong format for the port mappings of --source-listen-port! Example: SSH1=5555,SSH2=6666."),
        ("-s", "SSH1=", "Wrong format for the port mapping 'SSH1=' of --source-listen-port. Example: SSH1=5555"),
        ("-s", "S SH=1", "Invalid service ID in --source-listen-port mapping 'S SH=1': "
                         "Service ID must contain only alphanumeric characters, hyphens, and underscores"),
        ("-s", ",", "Must provide at least one port or port mapping for --source-listen-port!"),
    ],
)
def test_bad_mappings(option: str, value: str, reason: str) -> None:
    assert usage_error("-r", "us-east-1", option, value) == reason


def test_duplicate_mapping_first_wins_with_warning() -> None:
    parsed = parse("-r", "us-east-1", "-s", "SSH=1,SSH=2")
    assert dict(parsed.config.services) == {"SSH": SourcePort(1)}
    assert any(level == logging.WARNING and "Duplicate mappings" in m for level, m in parsed.log_messages)


# --- --config-dir ------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_dir_adds_mappings_cli_wins(tmp_path: Path) -> None:
    directory = tmp_path / "maps"
    _write(directory / "a.ini", "# comment\n\nSSH1=22\nWEB = 10.0.0.1:80\n")
    _write(directory / "sub" / "b.ini", "; other comment\nSSH1=2222\nSOCK=/run/s.sock\n")
    config = parse("-r", "us-east-1", "-d", "WEB=8080", "--config-dir", str(directory)).config
    assert dict(config.services) == {
        "WEB": DestinationTarget(host="localhost", port=8080),  # command line wins
        "SSH1": DestinationTarget(host="localhost", port=22),  # first file wins
        "SOCK": DestinationTarget(unix_path="/run/s.sock"),
    }
    assert config.optional_services == {"SSH1", "SOCK"}


def test_mode_alone_takes_mappings_from_default_config_dir(tmp_path: Path) -> None:
    _write(tmp_path / "config" / "ports", "SSH=5555\nnot a mapping\nWEB=abc\n")
    parsed = parse("-r", "us-east-1", "-m", "src")
    assert dict(parsed.config.services) == {"SSH": SourcePort(5555)}
    warnings = [m for level, m in parsed.log_messages if level == logging.WARNING]
    assert len(warnings) == 2 and "ports:2" in warnings[0] and "ports:3" in warnings[1]


def test_default_config_dir_missing_is_fine() -> None:
    config = parse("-r", "us-east-1", "-m", "source").config
    assert dict(config.services) == {}
    assert config.mode is Mode.SOURCE


def test_destination_mode_without_any_mapping_is_an_error(tmp_path: Path) -> None:
    message = usage_error("-r", "us-east-1", "-m", "dst")
    assert message.startswith("Destination mode needs a service mapping")


def test_explicit_config_dir_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Invalid configuration directory: .*nowhere"):
        parse("-r", "us-east-1", "-m", "dst", "--config-dir", str(tmp_path / "nowhere"))
    _write(tmp_path / "strict" / "f", "SSH=22\nWEB=host\n")
    with pytest.raises(ConfigError, match=r"f:2: Endpoint needs a port"):
        parse("-r", "us-east-1", "-m", "dst", "--config-dir", str(tmp_path / "strict"))


def test_v1_mapping_ignores_config_dir(tmp_path: Path) -> None:
    _write(tmp_path / "config" / "f", "SSH=6666\n")
    config = parse("-r", "us-east-1", "-s", "5555").config
    assert dict(config.services) == {V1_SERVICE: SourcePort(5555)}


# --- precedence: command line > --config > environment > settings -----------------

def test_config_file_values_and_cli_override(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path / "lp.ini",
        "# reference style\nregion = us-west-2\nsource-listen-port = 6000 # trailing comment\n"
        "local-bind-address = ::1\nno-ssl-host-verify = true\nverbose = 5\n",
    )
    parsed = parse("--config", str(config_file))
    assert parsed.config.region == "us-west-2"
    assert dict(parsed.config.services) == {V1_SERVICE: SourcePort(6000)}
    assert parsed.config.bind_address == "::1"
    assert parsed.config.verify_ssl is False
    assert parsed.verbosity == 5
    override = parse("--config", str(config_file), "-r", "eu-west-1", "-s", "7000", "-v", "3")
    assert override.config.region == "eu-west-1"
    assert dict(override.config.services) == {V1_SERVICE: SourcePort(7000)}
    assert override.verbosity == 3


def test_region_and_endpoint_precedence(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "lp.ini", "region = us-west-2\ndestination-app = 22\n")
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "eu-west-1", "AWSIOT_TUNNEL_ENDPOINT": "env.example:1234"}
    # --config beats the environment (both env variables set: the file decides).
    assert parse("--config", str(config_file), env=env).config.region == "us-west-2"
    # The command line beats both.
    cli = parse("--config", str(config_file), "-e", "cli.example", env=env).config
    assert cli.endpoint.host == "cli.example" and cli.region is None
    # Environment alone: one of the two, not both.
    only_region = {**ENV, "AWSIOT_TUNNEL_REGION": "eu-west-1"}
    assert parse("-s", "1", env=only_region).config.region == "eu-west-1"
    only_endpoint = {**ENV, "AWSIOT_TUNNEL_ENDPOINT": "ws://127.0.0.1:9"}
    assert parse("-s", "1", env=only_endpoint).config.endpoint == ServiceEndpoint("127.0.0.1", 9, False)
    assert usage_error("-s", "1", env=env).startswith("Must specify one and only one of --region/-r")


def test_token_sources_and_warnings(tmp_path: Path) -> None:
    from_env = parse("-r", "us-east-1", "-s", "1")
    assert from_env.config.access_token == TOKEN
    assert not any("access token" in m for _, m in from_env.log_messages)
    cli_token = "cli-" + secrets.token_hex(20)
    from_cli = parse("-r", "us-east-1", "-s", "1", "-t", cli_token)
    assert from_cli.config.access_token == cli_token  # command line beats the environment
    assert (
        logging.WARNING,
        "Found access token supplied via CLI arg. Consider using environment variable "
        "AWSIOT_TUNNEL_ACCESS_TOKEN instead",
    ) in from_cli.log_messages
    file_token = "file-" + secrets.token_hex(20)
    config_file = _write(tmp_path / "t.ini", f"access-token = {file_token}\n")
    from_file = parse("-r", "us-east-1", "-s", "1", "--config", str(config_file))
    assert from_file.config.access_token == file_token
    assert any("supplied via --config file" in m for _, m in from_file.log_messages)
    for token in (TOKEN, cli_token, file_token):
        assert redact(f"x{token}y") == f"x{REDACTED}y"
        assert token not in repr(from_file.config)


def test_client_token_from_env_and_cli() -> None:
    env_client = "e" * 32
    cli_client = "C-" + "1" * 40
    env = {**ENV, "AWSIOT_TUNNEL_CLIENT_TOKEN": env_client}
    assert parse("-r", "us-east-1", "-s", "1", env=env).config.client_token == env_client
    assert parse("-r", "us-east-1", "-s", "1", "-i", cli_client, env=env).config.client_token == cli_client
    assert redact(cli_client) == REDACTED


def test_https_proxy_environment() -> None:
    password = "pw-" + secrets.token_hex(6)
    env = {**ENV, "HTTPS_PROXY": "http://upper.example:3128", "https_proxy": f"http://u:{password}@lower.example"}
    config = parse("-r", "us-east-1", "-s", "1", env=env).config
    assert config.https_proxy == f"http://u:{password}@lower.example"  # lower case wins, as the reference
    assert redact(password) == REDACTED
    assert password not in repr(config)
    upper = parse("-r", "us-east-1", "-s", "1", env={**ENV, "HTTPS_PROXY": "https://p.example:8443"})
    assert upper.config.https_proxy == "https://p.example:8443"
    secret = "sec-" + secrets.token_hex(6)
    message = usage_error("-r", "us-east-1", "-s", "1", env={**ENV, "HTTPS_PROXY": f"socks5://u:{secret}@h"})
    assert message.startswith("Failed to parse the value of environment variable HTTPS_PROXY")
    assert secret not in message
    # Found by the command-line fuzzer: urllib raises ValueError on an unbalanced "[".
    broken = usage_error("-r", "us-east-1", "-s", "1", env={**ENV, "https_proxy": "http://[::1"})
    assert broken == "Failed to parse the value of environment variable https_proxy: not a URL"


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read config file"):
        parse("--config", str(tmp_path / "missing.ini"))
    token_line = _write(tmp_path / "bad.ini", f"access-token {TOKEN}\n")
    with pytest.raises(ConfigError) as caught:
        parse("--config", str(token_line))
    assert "invalid line (line 1" in str(caught.value) and TOKEN not in str(caught.value)
    unknown = _write(tmp_path / "unknown.ini", "colour = blue\n")
    assert usage_error("--config", str(unknown)).startswith("unrecognised option 'colour'")
    twice = _write(tmp_path / "twice.ini", "region = a\nregion = b\n")
    assert usage_error("--config", str(twice)) == "option 'region' cannot be specified more than once"
    helpless = _write(tmp_path / "help.ini", "help = true\n")
    assert "cannot be used in a --config file" in usage_error("--config", str(helpless))


# --- secrets in a failing run ------------------------------------------------------

def test_tokens_never_in_output_of_failing_run_at_trace(tmp_path: Path) -> None:
    """-t and env tokens at -v 6 against a closed port: the run fails, the tokens stay hidden."""
    cli_token = "CLI" + secrets.token_hex(24)
    env_token = "ENV" + secrets.token_hex(24)
    client_token = "client-" + secrets.token_hex(16)
    settings = _write(
        tmp_path / "fast.json",
        '{"tunneling": {"proxy": {"websocket": {"connect_retry_count": "0", "retry_delay_ms": "50"}}}}',
    )
    result = run_cli(
        "-t", cli_token, "-i", client_token, "-e", "ws://127.0.0.1:1", "-s", "0", "-v", "6",
        "--settings-json", str(settings),
        env={"AWSIOT_TUNNEL_ACCESS_TOKEN": env_token},
        timeout=20,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Found access token supplied via CLI arg" in output  # logging did run at -v 6
    for secret in (cli_token, env_token, client_token):
        assert secret not in output
