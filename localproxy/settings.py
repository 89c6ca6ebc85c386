"""Fine-grained settings (``tunneling.proxy.*``): their typed values and defaults.

At the bottom of the package: every layer reads a :class:`Settings`. Reading and
writing their JSON form is the configuration layer's
(:mod:`localproxy.config.settings_json`).
"""

from __future__ import annotations

from dataclasses import field
from types import MappingProxyType
from typing import Mapping

from localproxy.records import record

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"
SUBPROTOCOLS = (V3, V2, V1)

_DEFAULT_OVERRIDES = {
    "cn-north-1": "data.tunneling.iot.cn-north-1.amazonaws.com.cn",
    "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn",
}


@record(frozen=True)
class Settings:
    """Values of the ``tunneling.proxy`` settings tree, typed."""

    default_bind_address: str = "localhost"
    data_length_size: int = 2
    data_frame_max_size: int = 65538
    max_payload_size: int = 64512
    max_size: int = 65536
    tcp_connection_retry_count: int = 5
    tcp_connection_retry_delay_ms: int = 2500
    tcp_read_buffer_size: int = 131076
    tcp_max_active_connections: int = 128
    ping_period_ms: int = 20000
    retry_delay_ms: int = 2500
    connect_retry_count: int = -1
    reconnect_on_data_error: bool = True
    subprotocol: str = V3
    max_frame_size: int = 131076
    ws_write_buffer_size: int = 131076
    ws_read_buffer_size: int = 131076
    # Ours (not in the reference; read from --settings-json, not exported): see tunnel/receive_policy.py.
    receive_budget_bytes: int = 4 * 1024 * 1024
    stalled_reader_timeout_ms: int = 10_000
    ws_socket_receive_buffer: int = 0  # SO_RCVBUF of the websocket; 0: the kernel's autotuning (see websocket/session.py)
    region_endpoint_overrides: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(dict(_DEFAULT_OVERRIDES))
    )


# Dotted key (as in the reference) -> Settings attribute name.
SETTING_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "tunneling.proxy.default_bind_address": "default_bind_address",
        "tunneling.proxy.message.data_length_size": "data_length_size",
        "tunneling.proxy.message.data_frame_max_size": "data_frame_max_size",
        "tunneling.proxy.message.max_payload_size": "max_payload_size",
        "tunneling.proxy.message.max_size": "max_size",
        "tunneling.proxy.tcp.connection_retry_count": "tcp_connection_retry_count",
        "tunneling.proxy.tcp.connection_retry_delay_ms": "tcp_connection_retry_delay_ms",
        "tunneling.proxy.tcp.read_buffer_size": "tcp_read_buffer_size",
        "tunneling.proxy.tcp.max_active_connections": "tcp_max_active_connections",
        "tunneling.proxy.websocket.ping_period_ms": "ping_period_ms",
        "tunneling.proxy.websocket.retry_delay_ms": "retry_delay_ms",
        "tunneling.proxy.websocket.connect_retry_count": "connect_retry_count",
        "tunneling.proxy.websocket.reconnect_on_data_error": "reconnect_on_data_error",
        "tunneling.proxy.websocket.subprotocol": "subprotocol",
        "tunneling.proxy.websocket.max_frame_size": "max_frame_size",
        "tunneling.proxy.websocket.write_buffer_size": "ws_write_buffer_size",
        "tunneling.proxy.websocket.read_buffer_size": "ws_read_buffer_size",
    }
)
# Settings of ours: accepted in --settings-json like the reference's, never exported
# (--export-default-settings keeps the reference's exact shape).
EXTRA_SETTING_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "tunneling.proxy.tcp.receive_budget_bytes": "receive_budget_bytes",
        "tunneling.proxy.tcp.stalled_reader_timeout_ms": "stalled_reader_timeout_ms",
        "tunneling.proxy.websocket.socket_receive_buffer_bytes": "ws_socket_receive_buffer",
    }
)
REGION_OVERRIDES_PREFIX = "tunneling.proxy.region_endpoint_overrides."
