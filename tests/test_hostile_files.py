"""Issue 22, items 6-8: hostile or careless files on the command line.

Each case runs ``python -m localproxy`` as a child (real files, FIFOs and devices)
and asserts the exit code, the message, no traceback, no secret in any output,
and that the child ended by itself with a bounded peak RSS (``os.wait4``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localproxy.config.command_line import parse_command_line
from localproxy.errors import ConfigError, ExitCode
from localproxy.ops.files import (
    MAX_CONFIG_BYTES,
    MAX_SMALL_FILE_BYTES,
    UnsuitableFile,
    read_bounded,
    read_user_text,
)
from localproxy.ops.json_limits import JsonRefused, loads_bounded

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
TOKEN = "AQGAAXj-hostile-files-access-token-c2VjcmV0"  # in the environment of every child
SECRET = "AQGAAXjSECRET0value+in/a/file=="
CLIENT_SECRET = "0123abcd-4567-89ef-aaaa-bbbbccccdddd"  # shaped like a UUID client token
ARGS = ["-e", "ws://127.0.0.1:9", "-d", "SSH=22", "-v", "4"]
MAX_CHILD_RSS_KIB = 200 * 1024  # a child that read /dev/zero into memory would blow past this


_PEAK_WRAPPER = (
    "import os, resource, subprocess, sys\n"
    "os.setpgrp()  # the test kills the group on a timeout\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "os.write(int(sys.argv[1]), str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())\n"
    "sys.exit(code)\n"
)


def run(*args: str) -> tuple[int, str, int]:
    """(exit code, stdout+stderr, peak RSS in KiB) of ``python -m localproxy args``, ended by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    env.update(AWSIOT_TUNNEL_ACCESS_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    # Linux carries a process's peak RSS across fork and exec (the child of a big pytest
    # process "peaks" at pytest's size), so a small Python process starts the proxy
    # and reports its child's own peak (RUSAGE_CHILDREN) on fd 3.
    report_read, report_write = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", _PEAK_WRAPPER, str(report_write), sys.executable, "-m", "localproxy", *args],
        cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=(report_write,),
    )
    os.close(report_write)
    deadline = time.monotonic() + TIMEOUT
    assert child.stdout is not None
    os.set_blocking(child.stdout.fileno(), False)
    output = b""
    while True:  # bounded by the deadline; the child must end on its own
        pid, status, _ = os.wait4(child.pid, os.WNOHANG)
        chunk = child.stdout.read() or b""
        output += chunk
        if pid:
            output += child.stdout.read() or b""
            child.returncode = os.waitstatus_to_exitcode(status)
            with os.fdopen(report_read) as report:
                peak = int(report.read() or 0)
            assert peak > 0, "the wrapper did not report its child's peak RSS"
            return child.returncode, output.decode(errors="replace"), peak
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            os.close(report_read)
            raise AssertionError(f"the child did not end within {TIMEOUT} s (blocked?):\n{output.decode()}")
        time.sleep(0.02)  # polling a child's exit, not waiting for readiness


def assert_clean(output: str, *secrets: str) -> None:
    assert "Traceback" not in output and not re.search(r"^\w+(Error|Exception):", output, re.M), output
    for secret in (TOKEN, *secrets):
        assert secret not in output, f"{secret!r} leaked:\n{output}"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)  # no writer ever opens it: open() for reading would block forever
    return path


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    path = tmp_path / "huge"
    with open(path, "wb") as sparse:  # 2 GiB of holes: huge, and costs no disk
        sparse.truncate(2 << 30)
    return path


# --- item 6: a FIFO, a device or a huge file as any file the proxy reads ----------------

@pytest.mark.parametrize("option", ["--config", "--settings-json", "--client-token-file"])
@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_fifo_device_or_huge_file_is_a_config_error_not_a_hang(
    option: str, kind: str, fifo: Path, huge: Path
) -> None:
    path = {"fifo": str(fifo), "device": "/dev/zero", "huge": str(huge)}[kind]
    code, output, rss = run(*ARGS, option, path)
    assert code == ExitCode.CONFIG, output
    reason = {
        "fifo": "not a regular file (a FIFO)",
        "device": "not a regular file (a character device)",
        "huge": f"larger than the {MAX_SMALL_FILE_BYTES if option == '--client-token-file' else MAX_CONFIG_BYTES}"
                "-byte limit",
    }[kind]
    what = {"--config": "config file", "--settings-json": "settings file", "--client-token-file": "client token file"}
    assert f"Cannot read {what[option]} " in output and reason in output, output
    assert_clean(output)
    assert rss < MAX_CHILD_RSS_KIB


def test_a_fifo_in_the_config_dir_is_refused(tmp_path: Path, fifo: Path) -> None:
    """A FIFO swapped in for a mapping file: refused by type, never opened for a blocking read."""
    config_dir = tmp_path / "mappings"
    config_dir.mkdir()
    (config_dir / "a.conf").write_text("SSH=22\n")
    os.symlink(fifo, config_dir / "b.conf")
    with pytest.raises(ConfigError, match=r"Cannot read configuration file .*b\.conf: not a regular file \(a FIFO\)"):
        read_user_text(str(config_dir / "b.conf"), "configuration file")
    code, output, _ = run("-e", "ws://127.0.0.1:9", "-m", "dst", "--config-dir", str(config_dir), "-v", "4",
                          "--client-token-file", str(fifo))
    assert code == ExitCode.CONFIG and "not a regular file (a FIFO)" in output, output
    assert_clean(output)


def test_the_bounded_reader(tmp_path: Path, fifo: Path) -> None:
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * 100)
    assert read_bounded(str(exact), 100) == b"x" * 100
    with pytest.raises(UnsuitableFile, match="larger than the 99-byte limit"):
        read_bounded(str(exact), 99)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a directory"), (Path("/dev/null"), "a character device")):
        with pytest.raises(UnsuitableFile, match=f"not a regular file \\({kind}\\)"):
            read_bounded(str(path), 100)
    with pytest.raises(FileNotFoundError):
        read_bounded(str(tmp_path / "missing"), 100)
    binary = tmp_path / "binary"
    binary.write_bytes(b"region = \xff" + SECRET.encode())
    with pytest.raises(ConfigError) as caught:
        read_user_text(str(binary), "config file")
    assert "not UTF-8 text (byte 9)" in str(caught.value) and SECRET not in str(caught.value)


def test_sigterm_still_stops_a_proxy_given_a_client_token_file(tmp_path: Path) -> None:
    """The token file is read in the event loop: a good one leaves SIGTERM working."""
    token_file = tmp_path / "client-token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL_")}
    env.update(AWSIOT_TUNNEL_ACCESS_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "localproxy", *ARGS, "--client-token-file", str(token_file)],
        cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert child.stdout is not None
        for _ in range(200):  # lines until the loop runs (bounded: 200 lines or the timeout below)
            line = child.stdout.readline().decode()
            assert line, "the proxy ended early"
            if "Attempting to establish web socket connection" in line:
                break
        child.send_signal(signal.SIGTERM)
        assert child.wait(TIMEOUT) == 0
        assert token_file.read_text().strip()  # it was created, then SIGTERM still worked
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --- item 7: config and settings errors never echo a secret --------------------------

@pytest.mark.parametrize(
    ("text", "code", "expected"),
    [
        (f"access-token: {SECRET}\n", ExitCode.USAGE, "unrecognised option (line 1 of "),
        (f"region = us-east-1\nno-ssl-host-verify = {SECRET}\n", ExitCode.USAGE,
         "the argument for option 'no-ssl-host-verify' is invalid (line 2 of "),
        (f"[{SECRET}]\nregion = us-east-1\n", ExitCode.USAGE, "unrecognised option (line 2 of "),
        (f"{SECRET}\n", ExitCode.USAGE, "unrecognised option (line 1 of "),  # a token pasted alone ("==")
        (f"{CLIENT_SECRET} = x\n", ExitCode.USAGE, "unrecognised option (line 1 of "),
        (f"access-token {SECRET.rstrip('=')}\n", ExitCode.CONFIG, "contains an invalid line (line 1 of "),
    ],
)
def test_config_file_errors_name_the_line_never_its_value(tmp_path: Path, text: str, code: int, expected: str) -> None:
    config = tmp_path / "proxy.ini"
    config.write_text(text)
    status, output, _ = run(*ARGS, "--config", str(config))
    assert status == code and expected in output, output
    assert_clean(output, SECRET, SECRET.rstrip("="), CLIENT_SECRET)


def test_reference_strings_stay_exact_where_no_secret_is_at_stake(tmp_path: Path) -> None:
    config = tmp_path / "proxy.ini"
    config.write_text("colour = blue\n")
    status, output, _ = run(*ARGS, "--config", str(config))
    assert status == ExitCode.USAGE
    assert output.startswith(f"unrecognised option 'colour' (line 1 of {config})\n"), output
    status, output, _ = run("-Z")
    assert output == "unrecognised option '-Z'\nTry 'localproxy --help' for a list of options.\n"


def test_settings_keys_that_are_not_keys_are_not_quoted(tmp_path: Path) -> None:
    settings = tmp_path / "settings.json"
    junk = {f"junk{index}": 1 for index in range(100)}
    settings.write_text(json.dumps({SECRET: "1", "line\nbreak\x1b[31m": 2, **junk}))
    parsed = parse_command_line([*ARGS, "-t", TOKEN, "--settings-json", str(settings)], {})
    messages = [message for _, message in parsed.log_messages]
    text = "\n".join(messages)
    assert SECRET not in text and "\x1b" not in text and "line\nbreak" not in text
    assert "(a key of 31 characters, not shown" in text
    # 102 unknown keys: 20 lines and a count, not 102 lines.
    assert sum("Ignoring unknown setting" in m for m in messages) == 20
    assert "Ignoring 82 more unknown settings in" in text
    bad_value = tmp_path / "bad.json"
    bad_value.write_text(json.dumps({f"tunneling.proxy.{SECRET}": {"x": 1}, "tunneling.proxy.tcp.read_buffer_size": SECRET}))
    status, output, _ = run(*ARGS, "--settings-json", str(bad_value))
    assert status == ExitCode.USAGE and "'tunneling.proxy.tcp.read_buffer_size'" in output, output
    assert_clean(output, SECRET)


# --- item 8: no traceback on bad files ------------------------------------------------

@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"tunneling": {"proxy": {"tcp": {"read_buffer_size": ' + "9" * 5000 + "}}}}",
         "a number has too many digits"),
        ('{"tunneling": {"proxy": {"tcp": {"read_buffer_size": "' + "9" * 5000 + '"}}}}',
         "expected an integer of at most 18 digits"),
        ("[" * 100_000, "nested deeper than 32 levels"),
        ('{"a":' * 100_000, "nested deeper than 32 levels"),
        ('{"tunneling": {"proxy": {"tcp": {"read_buffer_size": 1e999}}}}', "expected an integer"),
    ],
)
def test_bad_settings_files_are_clear_errors(tmp_path: Path, content: str, expected: str) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(content)
    code, output, rss = run(*ARGS, "--settings-json", str(settings))
    assert code in (ExitCode.USAGE, ExitCode.CONFIG) and expected in output, output
    assert code == (ExitCode.USAGE if "integer" in expected else ExitCode.CONFIG)
    assert_clean(output)
    assert rss < MAX_CHILD_RSS_KIB


def test_dev_zero_as_config_and_settings_ends_at_once() -> None:
    for option, what in (("--config", "config file"), ("--settings-json", "settings file")):
        code, output, rss = run(*ARGS, option, "/dev/zero")
        assert code == ExitCode.CONFIG
        assert output == f"Cannot read {what} /dev/zero: not a regular file (a character device)\n"
        assert rss < MAX_CHILD_RSS_KIB


def test_loads_bounded() -> None:
    assert loads_bounded('{"a": ["[[[", {"b": "]]]"}]}', 3) == {"a": ["[[[", {"b": "]]]"}]}
    assert loads_bounded(b'"\\"[[["', 1) == '"[[['  # brackets in strings (and escaped quotes) do not nest
    with pytest.raises(JsonRefused, match="nested deeper than 3 levels"):
        loads_bounded("[[[[1]]]]", 3)
    with pytest.raises(JsonRefused, match="too many digits"):
        loads_bounded("1" * 5000, 3)
    with pytest.raises(json.JSONDecodeError):
        loads_bounded("[1,", 3)
