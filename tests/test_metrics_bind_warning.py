"""``--metrics-bind`` on a non-loopback address warns as loudly as ``-b`` and ``-k`` do (issue 22)."""

from __future__ import annotations

import logging

import pytest

from localproxy.config.command_line import parse_command_line

BASE = ["-r", "us-east-1", "-s", "5555", "--metrics-port", "0"]
ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "AQGAAFdTestTokenForMetrics"}


def warnings_of(argv: list[str]) -> list[str]:
    parsed = parse_command_line(argv, ENV)
    return [message for level, message in parsed.log_messages if level == logging.WARNING]


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.10", "metrics.example"])
def test_non_loopback_metrics_bind_warns(address: str) -> None:
    (warning,) = [w for w in warnings_of([*BASE, "--metrics-bind", address]) if "metrics server" in w]
    assert warning.startswith("SECURITY WARNING") and address in warning and "AQGA" not in warning


@pytest.mark.parametrize("extra", [[], ["--metrics-bind", "127.0.0.1"], ["--metrics-bind", "::1"], ["--metrics-bind", "localhost"]])
def test_loopback_metrics_bind_is_quiet(extra: list[str]) -> None:
    assert not [w for w in warnings_of([*BASE, *extra]) if "metrics server" in w]
