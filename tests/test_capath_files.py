"""``-c``/``--capath``: a FIFO or a device named like a certificate hash is refused at
start (OpenSSL would open it during the handshake, in the event loop, and block there:
issue 22, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localproxy.config.command_line import parse_command_line
from localproxy.errors import ConfigError

ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "AQGAAFdTestTokenForCapath"}


def argv(capath: Path) -> list[str]:
    return ["-r", "us-east-1", "-s", "5555", "-c", str(capath)]


def test_a_hashed_ca_directory_of_regular_files_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "5ed36f99.0").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "notes.txt").write_text("anything")
    os.mkfifo(tmp_path / "not-a-hash-name")  # OpenSSL never opens it
    assert parse_command_line(argv(tmp_path), ENV).config is not None


@pytest.mark.parametrize("name", ["5ed36f99.0", "5ed36f99.r1", "link-to-fifo"])
def test_a_fifo_named_like_a_hash_is_refused(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / ("5ed36f99.1" if name == "link-to-fifo" else name)
    os.mkfifo(tmp_path / "fifo")
    if name == "link-to-fifo":
        fifo.symlink_to(tmp_path / "fifo")  # followed, as OpenSSL follows it
    else:
        (tmp_path / "fifo").rename(fifo)
    with pytest.raises(ConfigError, match=r"--capath\) holds '5ed36f99\.r?[01]', which is a FIFO"):
        parse_command_line(argv(tmp_path), ENV)


def test_the_command_exits_2_with_the_reason_and_no_traceback(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "0123abcd.0")
    result = subprocess.run(
        [sys.executable, "-m", "localproxy", *argv(tmp_path)],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "0123abcd.0" in result.stderr and "FIFO" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "AQGAAFdTestTokenForCapath" not in result.stderr + result.stdout
