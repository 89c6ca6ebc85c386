"""Settings export/import (--export-default-settings / --settings-json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localproxy.cli import parse_command_line
from localproxy.config.settings_json import (
    export_settings,
    load_settings_json,
    settings_from_tree,
    settings_to_tree,
)
from localproxy.errors import ConfigError, UsageError
from localproxy.settings import V1, Settings

REPO = Path(__file__).resolve().parents[1]

# PROTOCOL.md 5, verbatim: the reference's tree, values as strings.
EXPECTED_TREE = {
    "tunneling": {
        "proxy": {
            "default_bind_address": "localhost",
            "message": {
                "data_length_size": "2",
                "data_frame_max_size": "65538",
                "max_payload_size": "64512",
                "max_size": "65536",
            },
            "tcp": {
                "connection_retry_count": "5",
                "connection_retry_delay_ms": "2500",
                "read_buffer_size": "131076",
                "max_active_connections": "128",
            },
            "websocket": {
                "ping_period_ms": "20000",
                "retry_delay_ms": "2500",
                "connect_retry_count": "-1",
                "reconnect_on_data_error": "true",
                "subprotocol": "aws.iot.securetunneling-3.0",
                "max_frame_size": "131076",
                "write_buffer_size": "131076",
                "read_buffer_size": "131076",
            },
            "region_endpoint_overrides": {
                "cn-north-1": "data.tunneling.iot.cn-north-1.amazonaws.com.cn",
                "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn",
            },
        }
    }
}


def _flat_order(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.extend(_flat_order(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])
    return keys


def test_tree_has_reference_shape_and_order() -> None:
    tree = settings_to_tree(Settings())
    assert tree == EXPECTED_TREE
    assert _flat_order(tree) == _flat_order(EXPECTED_TREE)


def test_export_writes_pretty_json_like_boost(tmp_path: Path) -> None:
    path = tmp_path / "lp.json"
    export_settings(str(path))
    text = path.read_text()
    assert text.startswith('{\n    "tunneling": {\n        "proxy": {\n            "default_bind_address": "localhost",\n')
    assert text.endswith("}\n")
    assert json.loads(text) == EXPECTED_TREE


def test_round_trip_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "lp.json"
    export_settings(str(path))
    settings, warnings = load_settings_json(str(path))
    assert settings == Settings()
    assert warnings == []


def test_import_overrides_numbers_bools_and_strings(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "tunneling": {
                    "proxy": {
                        "tcp": {"connection_retry_count": 0, "connection_retry_delay_ms": "50"},
                        "websocket": {
                            "reconnect_on_data_error": False,
                            "subprotocol": V1,
                            "connect_retry_count": "3",
                        },
                        "region_endpoint_overrides": {"us-gov-west-1": "data.example.test"},
                    }
                }
            }
        )
    )
    settings, warnings = load_settings_json(str(path))
    assert warnings == []
    assert settings.tcp_connection_retry_count == 0
    assert settings.tcp_connection_retry_delay_ms == 50
    assert settings.reconnect_on_data_error is False
    assert settings.subprotocol == V1
    assert settings.connect_retry_count == 3
    assert settings.ping_period_ms == Settings().ping_period_ms  # untouched
    assert settings.region_endpoint_overrides["us-gov-west-1"] == "data.example.test"
    assert "cn-north-1" in settings.region_endpoint_overrides  # defaults kept


def test_dotted_keys_are_accepted() -> None:
    settings, _ = settings_from_tree({"tunneling.proxy.websocket.retry_delay_ms": "100"})
    assert settings.retry_delay_ms == 100


def test_socket_receive_buffer_is_ours_zero_means_autotuning() -> None:
    assert Settings().ws_socket_receive_buffer == 0  # the kernel's autotuning unless asked
    for value, expected in (("0", 0), ("1048576", 1 << 20), (65536, 65536)):
        settings, warnings = settings_from_tree({"tunneling.proxy.websocket.socket_receive_buffer_bytes": value})
        assert (settings.ws_socket_receive_buffer, warnings) == (expected, [])
    assert "socket_receive_buffer" not in json.dumps(settings_to_tree(Settings()))  # not exported


def test_unknown_keys_warn_not_fail() -> None:
    settings, warnings = settings_from_tree(
        {"tunneling": {"proxy": {"tcp": {"write_buffer_size": "1", "bogus": "x"}}}}, source="f.json"
    )
    assert settings == Settings()
    assert warnings == [
        "Ignoring unknown setting 'tunneling.proxy.tcp.write_buffer_size' in f.json",
        "Ignoring unknown setting 'tunneling.proxy.tcp.bogus' in f.json",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tunneling.proxy.websocket.retry_delay_ms", "soon"),
        ("tunneling.proxy.websocket.retry_delay_ms", -5),
        ("tunneling.proxy.websocket.retry_delay_ms", True),
        ("tunneling.proxy.websocket.retry_delay_ms", 1.5),
        ("tunneling.proxy.websocket.connect_retry_count", "-2"),
        ("tunneling.proxy.websocket.reconnect_on_data_error", "maybe"),
        ("tunneling.proxy.websocket.subprotocol", "aws.iot.securetunneling-9.0"),
        ("tunneling.proxy.message.max_payload_size", "70000"),
        ("tunneling.proxy.message.data_length_size", "4"),
        ("tunneling.proxy.default_bind_address", "bad host"),
        ("tunneling.proxy.region_endpoint_overrides.cn-north-1", 5),
        ("tunneling.proxy.websocket.socket_receive_buffer_bytes", "4096"),  # would stall TCP
        ("tunneling.proxy.websocket.socket_receive_buffer_bytes", -1),
    ],
)
def test_bad_values_are_usage_errors_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(UsageError) as caught:
        settings_from_tree({key: value}, source="s.json")
    assert f"'{key}'" in str(caught.value)
    assert "s.json" in str(caught.value)


def test_unreadable_or_malformed_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read settings file"):
        load_settings_json(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"tunneling": ')
    with pytest.raises(ConfigError, match="Cannot parse settings file .*line 1"):
        load_settings_json(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_settings_json(str(listed))


def test_export_to_unwritable_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot write settings"):
        export_settings(str(tmp_path / "no" / "such" / "dir.json"))


def test_export_option_needs_nothing_else() -> None:
    parsed = parse_command_line(["--export-default-settings", "out.json"], {})
    assert parsed.export_settings_path == "out.json"
    assert parsed.config is None


def test_export_command_writes_file_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "exported.json"
    result = subprocess.run(
        [sys.executable, "-m", "localproxy", "--export-default-settings", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text()) == EXPECTED_TREE


def test_settings_json_option_feeds_config_and_region_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "tunneling": {
                    "proxy": {
                        "websocket": {"retry_delay_ms": "75"},
                        "region_endpoint_overrides": {"xx-test-1": "data.xx.example"},
                    }
                }
            }
        )
    )
    argv = ["-r", "xx-test-1", "-s", "5555", "--settings-json", str(path)]
    parsed = parse_command_line(argv, {"AWSIOT_TUNNEL_ACCESS_TOKEN": "A" * 40}, cwd=str(tmp_path))
    assert parsed.config is not None
    assert parsed.config.settings.retry_delay_ms == 75
    assert parsed.config.endpoint.host == "data.xx.example"
    assert parsed.config.endpoint.port == 443 and parsed.config.endpoint.tls
    assert any("Using settings specified in file" in message for _, message in parsed.log_messages)
