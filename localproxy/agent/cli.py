"""``localproxy-agent`` / ``python -m localproxy.agent``: the device agent as a program.

    localproxy-agent --thing-name T --mqtt-endpoint HOST[:8883] --cert F --key F --root-ca F \\
        --service SSH=22,VNC=127.0.0.1:5900 [--max-tunnels N] [-v 4]

Runs until SIGINT/SIGTERM (exit 0). Usage errors print the reason and a hint on
stderr and exit 1; unusable files (certificates, --config-dir) exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from localproxy._version import __version__
from localproxy.agent.agent import DEFAULT_MAX_TUNNELS, DeviceAgent
from localproxy.agent.events import (
    MqttConnected,
    MqttDisconnected,
    ProxyEvent,
    ProxyStarted,
    ProxyStopped,
)
from localproxy.agent.mqtt import MqttSettings, paho_logger
from localproxy.agent.notify import NOTIFY_TOPIC_TEMPLATE
from localproxy.agent.plan import WhenFull
from localproxy.config.command_line import (
    INSECURE_WARNING,
    exposed_metrics_warning,
    https_proxy_from_environment,
    operations_options,
)
from localproxy.config.mappings import (
    Notes,
    is_loopback_host,
    parse_mapping,
    read_config_dir,
)
from localproxy.config.settings_json import load_settings_json
from localproxy.errors import ExitCode, LocalProxyError, UsageError
from localproxy.events import Connected, Disconnected
from localproxy.ops.logs import setup_logging
from localproxy.ops.operations import Operations, OpsOptions, agent_status
from localproxy.ops.runtime import run_program, stop_on_signals
from localproxy.settings import Settings
from localproxy.types import Mode, ServiceTarget

if TYPE_CHECKING:
    from localproxy.ops.metrics import Gathered

__all__ = ["agent_from_args", "build_parser", "main", "serve_agent"]

log = logging.getLogger("localproxy.agent.cli")
PROG = "localproxy-agent"
TRY_HELP = f"Try '{PROG} --help' for a list of options."
MAX_TUNNELS_LIMIT = 64


class _Parser(argparse.ArgumentParser):
    """argparse that exits 1 with the reason and a hint, as ``localproxy`` does."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Device agent for AWS IoT Secure Tunneling: receives tunnel access tokens on "
        "$aws/things/<thing>/tunnels/notify and runs one destination local proxy per tunnel, "
        "replacing it when the token is rotated.",
    )
    parser.add_argument("--thing-name", required=True, help="this device's AWS IoT thing name")
    parser.add_argument(
        "--mqtt-endpoint", required=True, metavar="HOST[:PORT]",
        help="AWS IoT data endpoint (TLS, port 8883 by default; 443 uses ALPN), or mqtt://host:port "
        "for a local broker without TLS",
    )
    parser.add_argument("--cert", help="the thing's certificate (PEM)")
    parser.add_argument("--key", help="the certificate's private key (PEM)")
    parser.add_argument("--root-ca", help="CA file for the broker (Amazon Root CA 1); default: system CAs")
    parser.add_argument("--no-tls", action="store_true", help="plain MQTT (local test brokers only)")
    parser.add_argument("--client-id", help="MQTT client id (default: the thing name)")
    parser.add_argument(
        "--service", "-d", metavar="MAPPING",
        help="local services by id, as localproxy -d: SSH=22,VNC=127.0.0.1:5900 (or one unnamed port)",
    )
    parser.add_argument("--config-dir", help="directory of SERVICE=endpoint files (as localproxy --config-dir)")
    parser.add_argument(
        "--endpoint", metavar="URL",
        help="tunneling data endpoint override, e.g. ws://127.0.0.1:PORT for the emulator "
        "(default: from the notification's region)",
    )
    parser.add_argument("--capath", "-c", help="CA directory for the tunneling endpoint's TLS (as localproxy -c)")
    parser.add_argument(
        "--no-ssl-host-verify", "-k", action="store_true",
        help="turn off TLS verification of the tunneling endpoint (as localproxy -k; unsafe)",
    )
    parser.add_argument(
        "--max-tunnels", type=int, default=DEFAULT_MAX_TUNNELS,
        help=f"tunnels served at once (default {DEFAULT_MAX_TUNNELS})",
    )
    parser.add_argument(
        "--when-full", choices=[policy.value for policy in WhenFull], default=WhenFull.EVICT_OLDEST.value,
        help="a new tunnel beyond --max-tunnels stops the least recently started one (default) or is refused",
    )
    parser.add_argument("--settings-json", help="proxy settings file (as localproxy --settings-json)")
    parser.add_argument(
        "--notify-topic", default=NOTIFY_TOPIC_TEMPLATE,
        help="topic template, {thing} is replaced (default: %(default)s)",
    )
    parser.add_argument(
        "--mqtt-retry-ms", type=int, default=1000,
        help="first delay before reconnecting to the broker, growing with jitter up to 60 s (default 1000)",
    )
    parser.add_argument(
        "--metrics-port", metavar="PORT",
        help="serve Prometheus metrics on http://BIND:PORT/metrics (needs localproxy[metrics]; 0 picks a port)",
    )
    parser.add_argument("--metrics-bind", metavar="ADDRESS", help="address of the metrics server (default 127.0.0.1)")
    parser.add_argument("--log-format", metavar="FORMAT", help="reference (default) or json: one JSON object per line")
    parser.add_argument("-v", "--verbose", type=int, default=4, metavar="0..255",
                        help="log level as localproxy: 0 off ... 4 info (default), 5 debug, 6 trace")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return parser


def agent_from_args(args: argparse.Namespace) -> tuple[DeviceAgent, Notes]:
    """Check the options and build the agent (no I/O beyond reading the named files)."""
    notes: Notes = []
    if not 0 <= args.verbose <= 255:
        raise UsageError("--verbose must be between 0 and 255")
    if not 1 <= args.max_tunnels <= MAX_TUNNELS_LIMIT:
        raise UsageError(f"--max-tunnels must be between 1 and {MAX_TUNNELS_LIMIT}")
    if args.mqtt_retry_ms < 1:
        raise UsageError("--mqtt-retry-ms must be at least 1")
    if "{thing}" not in args.notify_topic:
        raise UsageError("--notify-topic must contain {thing}")
    services: dict[str, ServiceTarget] = {}
    if args.config_dir is not None:
        found, dir_notes = read_config_dir(args.config_dir, Mode.DESTINATION, strict=True)
        services.update(found)
        notes.extend(dir_notes)
    if args.service is not None:
        given, mapping_notes = parse_mapping(args.service, Mode.DESTINATION, "--service")
        services.update(given)  # the command line wins over the directory
        notes.extend(mapping_notes)
    if not services:
        raise UsageError("Give the local services to serve: --service SSH=22[,VNC=5900] or --config-dir DIR")
    settings = Settings()
    if args.settings_json is not None:
        settings, warnings = load_settings_json(args.settings_json)
        notes.extend((logging.WARNING, warning) for warning in warnings)
    mqtt = MqttSettings.parse(
        args.mqtt_endpoint,
        tls=False if args.no_tls else None,
        cert=args.cert,
        key=args.key,
        root_ca=args.root_ca,
        client_id=args.client_id,
        retry_delay_ms=args.mqtt_retry_ms,
        topic_template=args.notify_topic,
    )
    if mqtt.tls and mqtt.cert is None:
        notes.append((logging.WARNING, "No --cert/--key: AWS IoT Core refuses MQTT clients without a certificate"))
    agent = DeviceAgent(
        args.thing_name,
        mqtt,
        services,  # type: ignore[arg-type]  # destination mode: DestinationTarget only
        endpoint=args.endpoint,
        max_tunnels=args.max_tunnels,
        proxy_settings=settings,
        when_full=args.when_full,
        capath=args.capath,
        verify_ssl=not args.no_ssl_host_verify,
        https_proxy=https_proxy_from_environment(os.environ, notes),  # as localproxy: HTTPS_PROXY
    )
    if args.no_ssl_host_verify:
        notes.append((logging.WARNING, INSECURE_WARNING))
    return agent, notes


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        agent_args = agent_from_args(args)
        metrics_port, metrics_bind, log_format = operations_options(args.metrics_port, args.metrics_bind, args.log_format)
    except UsageError as error:
        print(error, file=sys.stderr)
        print(TRY_HELP, file=sys.stderr)
        return ExitCode.USAGE
    except LocalProxyError as error:
        print(error, file=sys.stderr)
        return error.exit_code
    agent, notes = agent_args
    setup_logging(args.verbose, log_format=log_format)
    if args.verbose >= 6:
        paho_logger.setLevel(logging.DEBUG)
    if metrics_port is not None and not is_loopback_host(metrics_bind):
        notes.append((logging.WARNING, exposed_metrics_warning(metrics_bind)))
    for level, message in notes:
        log.log(level, "%s", message)

    try:
        return int(run_program(run_agent(agent, OpsOptions(metrics_port, metrics_bind))))
    except KeyboardInterrupt:
        return ExitCode.OK
    except LocalProxyError as error:
        log.error("%s", error)
        return error.exit_code


async def run_agent(agent: DeviceAgent, operations: OpsOptions | None = None) -> int:
    """Run ``agent`` until SIGINT/SIGTERM; returns the exit status.

    ``operations``: metrics exporter; systemd is notified whenever ``NOTIFY_SOCKET`` is set.
    """
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with serve_agent(operations or OpsOptions(), agent), agent:
            await stop.wait()
            log.info("Stopping: closing the destination proxies and the MQTT connection")
    return ExitCode.OK


@contextlib.asynccontextmanager
async def serve_agent(options: OpsOptions, agent: DeviceAgent) -> AsyncIterator[Operations]:
    """Around a not yet started agent: metrics of it and its proxies, READY=1 once subscribed."""
    def gather() -> "Gathered":
        stats = agent.stats()
        return list(stats.proxies), stats

    operations = Operations(options, gather)
    await operations.start()

    def on_event(event: object) -> None:
        if isinstance(event, ProxyEvent):
            if not isinstance(event.event, (Connected, Disconnected)):
                return  # per-connection events do not change the status
        elif not isinstance(event, (MqttConnected, MqttDisconnected, ProxyStarted, ProxyStopped)):
            return
        operations.report(isinstance(event, MqttConnected), agent_status(agent.stats()))

    unsubscribe = agent.subscribe(on_event)
    try:
        yield operations
    finally:
        unsubscribe()
        await operations.close()
