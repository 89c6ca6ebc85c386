"""``python -m localproxy.emulator``: run the tunneling-service emulator.

Prints one JSON line on stdout once listening::

    {"api": "http://127.0.0.1:PORT", "data": "ws://127.0.0.1:PORT", "ca": null, "capath": null, "mqtt": null}

(``"mqtt": "mqtt://127.0.0.1:PORT"`` with ``--mqtt``: tunnel notifications are
published there, on an embedded broker or the external one ``--mqtt URL`` names.)

then logs to stderr until SIGINT/SIGTERM (exit 0). With ``--tls`` and no
``--cert``/``--key`` it makes a CA and a certificate for 127.0.0.1/localhost and
writes them to ``--ca-out`` (default: a temporary directory removed at exit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from localproxy.emulator.core import Emulator
from localproxy.emulator.faults import SERVICE_BANDWIDTH
from localproxy.errors import LocalProxyError
from localproxy.ops.files import MAX_CONFIG_BYTES, UnsuitableFile, check_regular_file
from localproxy.ops.runtime import run_program, stop_on_signals

logger = logging.getLogger("localproxy.emulator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localproxy.emulator",
        description="A local emulator of the AWS IoT Secure Tunneling service "
        "(control API for boto3 / aws CLI, and the data-plane websocket) on one port.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--tls", action=argparse.BooleanOptionalAction, default=False, help="serve https/wss (default: plain)"
    )
    parser.add_argument("--cert", type=Path, help="server certificate (PEM) to use with --tls")
    parser.add_argument("--key", type=Path, help="private key (PEM) of --cert")
    parser.add_argument("--ca-out", type=Path, help="directory for the generated CA (ca.pem, capath/)")
    parser.add_argument("--region", default="us-east-1", help="region in ARNs and notify payloads")
    parser.add_argument("-v", "--verbose", type=int, default=4, help="log level 0..6 like localproxy (default 4: info)")
    parser.add_argument(
        "--mqtt", nargs="?", const=True, default=False, metavar="URL",
        help="publish tunnel notifications ($aws/things/<thing>/tunnels/notify) on an embedded MQTT broker, "
        "or on the external broker at URL (mqtt://host:port)",
    )
    parser.add_argument("--mqtt-port", type=int, default=0, help="port of the embedded MQTT broker (default: a free one)")
    parser.add_argument(
        "--bandwidth", type=_bandwidth, metavar="BYTES_PER_SECOND",
        help="cap each direction of every tunnel at this rate (off by default); the real service "
        f"allows about {SERVICE_BANDWIDTH} (800 kB/s) per tunnel",
    )
    parser.add_argument(
        "--autotuned-buffers", action="store_true",
        help="let the kernel autotune the relay's socket buffers (megabytes queued per direction; 5-10%% more "
        "bulk throughput on loopback) instead of bounding each direction's queue to about 2 MiB",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=None, metavar="SECONDS",
        help="abort a websocket that carried no frame and no ping either way for SECONDS, as the service's "
        "load balancer does after about 60 s (default: off)",
    )
    parser.add_argument("--demo", action="store_true", help="run the end-to-end demo and exit")
    return parser


def _bandwidth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes per second, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes per second, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        from localproxy.emulator.demo import run_demo

        return run_demo(args)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be within 0..65535, got {args.port}")
    if not 0 <= args.mqtt_port <= 65535:
        parser.error(f"--mqtt-port must be within 0..65535, got {args.mqtt_port}")
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        parser.error(f"--idle-timeout must be a positive number of seconds, got {args.idle_timeout:g}")
    if isinstance(args.mqtt, str) and not args.mqtt.startswith("mqtt://"):
        parser.error(f"--mqtt takes a broker URL mqtt://host:port, got {args.mqtt!r}")
    for path in (args.cert, args.key):
        if path is None:
            continue
        try:  # a FIFO or a device would block or never end in OpenSSL's read
            check_regular_file(str(path), MAX_CONFIG_BYTES)
        except FileNotFoundError:
            parser.error(f"no such file: {path}")
        except (UnsuitableFile, OSError) as error:
            parser.error(f"cannot use {path}: {error.strerror if isinstance(error, OSError) else error}")
    from localproxy.ops.logs import setup_logging

    setup_logging(args.verbose, sys.stderr)  # stdout carries the JSON line
    try:
        return run_program(serve(args))
    except OSError as error:  # the port is taken, the address is not ours...
        print(f"localproxy.emulator: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    except LocalProxyError as error:  # --tls without localproxy[emulator-tls], a bad LOCALPROXY_EVENT_LOOP
        print(f"localproxy.emulator: {error}", file=sys.stderr)
        return error.exit_code


async def serve(args: argparse.Namespace) -> int:
    emulator = Emulator(
        host=args.host,
        port=args.port,
        tls=args.tls or args.cert is not None,
        region=args.region,
        cert=args.cert,
        key=args.key,
        ca_out=args.ca_out,
        mqtt=args.mqtt,
        mqtt_port=args.mqtt_port,
        bandwidth=args.bandwidth,
        idle_timeout=args.idle_timeout,
        autotuned_buffers=args.autotuned_buffers,
    )
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with emulator:
            line = {
                "api": emulator.api_url,
                "data": emulator.data_url,
                "ca": str(emulator.ca_pem_path) if emulator.ca_pem_path else None,
                "capath": str(emulator.capath) if emulator.capath else None,
                "mqtt": emulator.mqtt_url,
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            await stop.wait()
            logger.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
