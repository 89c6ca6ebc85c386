"""argv + environment + files -> :class:`ParsedCommand` (a :class:`ProxyConfig`).

Sources, highest first: command line, ``--config`` file, environment, then
``--settings-json`` over built-in defaults. Checks run in the reference's
order so the same bad command line gives the same first complaint. No I/O
beyond reading the named files; log lines are returned, not logged, because
logging is only set up once the verbosity is known.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Mapping, Sequence

from localproxy.config.mappings import (
    Notes,
    is_loopback_host,
    parse_mapping,
    read_config_dir,
    validate_host,
    validate_path,
    validate_service_id,
)
from localproxy.config.options import RawOptions, parse_argv, read_config_file
from localproxy.config.paths import socket_directory_problem
from localproxy.config.proxy_config import ProxyConfig
from localproxy.config.settings_json import load_settings_json
from localproxy.errors import ConfigError, UsageError
from localproxy.ops.files import ca_directory_problem
from localproxy.ops.logs import LOG_FORMATS, register_secret
from localproxy.records import record
from localproxy.settings import Settings
from localproxy.types import (
    V1_SERVICE,
    InProcess,
    Mode,
    ServiceEndpoint,
    ServiceTarget,
    SourceUnixSocket,
)

ENV_ACCESS_TOKEN = "AWSIOT_TUNNEL_ACCESS_TOKEN"
ENV_CLIENT_TOKEN = "AWSIOT_TUNNEL_CLIENT_TOKEN"
ENV_ENDPOINT = "AWSIOT_TUNNEL_ENDPOINT"
ENV_REGION = "AWSIOT_TUNNEL_REGION"
# The lower-case name wins, as in the reference.
ENV_HTTPS_PROXY_NAMES = ("https_proxy", "HTTPS_PROXY")

DEFAULT_VERBOSITY = 4
MAX_ACCESS_TOKEN_LENGTH = 4096
MAX_REGION_LENGTH = 64
MAX_ROTATIONS_LIMIT = 100
_CLIENT_TOKEN_PATTERN = re.compile(r"^[a-zA-Z0-9-]+$")
_REGION_PATTERN = re.compile(r"^[a-z0-9-]+$")
_TUNNEL_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_\-+=:]{1,128}$")
_MODES = {"src": Mode.SOURCE, "source": Mode.SOURCE, "dst": Mode.DESTINATION, "destination": Mode.DESTINATION}

INSECURE_WARNING = (
    "SECURITY WARNING: TLS host verification is disabled (-k/--no-ssl-host-verify). "
    "The connection to the tunneling service is not authenticated and can be intercepted "
    "(man-in-the-middle), exposing the access token and all tunnel traffic. "
    "Do not use this outside of testing."
)


def exposed_listeners_warning(address: str, option: str) -> str:
    """The warning for source listeners on a non-loopback address (as loud as -k's)."""
    return (
        f"SECURITY WARNING: the source listeners bind to {address} ({option}), not a loopback address. "
        "Anyone who can reach this host on the listening ports gets into the tunnel (to the "
        "destination's services). Bind to 127.0.0.1 unless other hosts must connect, and then firewall the ports."
    )


def exposed_metrics_warning(address: str) -> str:
    """The warning for a metrics server on a non-loopback address (--metrics-bind)."""
    return (
        f"SECURITY WARNING: the metrics server binds to {address} (--metrics-bind), not a loopback address. "
        "Anyone who can reach this host on the metrics port reads the tunnel's state, service names and "
        "traffic counters (never a token). Bind to 127.0.0.1 unless a scraper on another host needs it, "
        "and then firewall the port."
    )


@record(frozen=True)
class ParsedCommand:
    """What the command line asks for. ``config`` is None for help/version/export."""

    config: ProxyConfig | None = None
    verbosity: int = DEFAULT_VERBOSITY
    show_help: bool = False
    show_version: bool = False
    export_settings_path: str | None = None
    # (logging level, message) to log once logging is set up; never hold secrets.
    log_messages: tuple[tuple[int, str], ...] = ()
    # Operations (beyond the reference): see localproxy.ops.operations.
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    log_format: str = "reference"
    # --stdio SERVICE: the service id of the one connection over stdin/stdout
    # ("" = the tunnel's only service); None without --stdio.
    stdio_service: str | None = None


class _Layers:
    """The option sources in precedence order, each a name -> value dict."""

    def __init__(self, layers: Sequence[tuple[str, RawOptions]]) -> None:
        self.layers = layers

    def get(self, name: str) -> tuple[str | bool | None, str | None]:
        for source, options in self.layers:
            if name in options:
                return options[name], source
        return None, None

    def text(self, name: str) -> str | None:
        value, _ = self.get(name)
        return value if isinstance(value, str) else None

    def flag(self, name: str) -> bool:
        return self.get(name)[0] is True


def parse_command_line(
    argv: Sequence[str], environ: Mapping[str, str], *, cwd: str | None = None
) -> ParsedCommand:
    """Parse like the reference; raises :class:`UsageError` (exact reason) or ``ConfigError``.

    ``cwd`` is where the default ``./config`` mapping directory is looked for.
    """
    cli = parse_argv(argv)
    verbosity = _verbosity(cli["verbose"], "--verbose") if "verbose" in cli else None
    if cli.get("help"):
        return ParsedCommand(show_help=True)
    if cli.get("version"):
        return ParsedCommand(show_version=True)
    if "export-default-settings" in cli:
        return ParsedCommand(export_settings_path=str(cli["export-default-settings"]))

    notes: Notes = []
    config_path = cli.get("config")
    config_file = read_config_file(str(config_path)) if isinstance(config_path, str) else {}
    if verbosity is None:
        verbosity = _verbosity(config_file["verbose"], "verbose") if "verbose" in config_file else DEFAULT_VERBOSITY
    env = _environment_options(environ)
    layers = _Layers(
        [("command line", cli), (f"--config file {config_path}", config_file), ("environment", env)]
    )
    # Mask every token seen, even ones a higher source overrides, before any check.
    for _, options in layers.layers:
        for name in ("access-token", "client-token"):
            value = options.get(name)
            register_secret(value if isinstance(value, str) else None)

    settings = Settings()
    settings_path = layers.text("settings-json")
    if settings_path is not None:
        notes.append((logging.INFO, f"Using settings specified in file: {settings_path}"))
        settings, warnings = load_settings_json(settings_path)
        notes.extend((logging.WARNING, warning) for warning in warnings)

    # The reference's order: boost's "required" check, then -r/-e, then the
    # token checks, then the -r/-e formats, then the mode (PROTOCOL.md 5).
    if not isinstance(layers.get("access-token")[0], str):
        raise UsageError("the option '--access-token' is required but missing")
    region_source, region_or_endpoint = _choose_endpoint_or_region(layers, notes)
    access_token = _access_token(layers, notes)
    client_token = _client_token(layers)
    endpoint, region = _endpoint_and_region(region_source, region_or_endpoint, settings, notes)
    https_proxy = https_proxy_from_environment(environ, notes)
    stdio_service = _stdio_service(layers)
    mode, services, optional = _mode_and_services(layers, cwd, notes, stdio_service)
    _check_socket_directories(services)

    bind_address = layers.text("local-bind-address")
    if bind_address is not None:
        validate_host(bind_address, "Bind address")
    capath = layers.text("capath")
    if capath is not None:
        validate_path(capath, "CA path")
        if not os.path.exists(capath):
            raise UsageError(f"CA path '{capath}' (--capath) does not exist")
        if os.path.isdir(capath):
            problem = ca_directory_problem(capath)
            if problem is not None:
                raise ConfigError(f"CA path '{capath}' (--capath) {problem}")
    verify_ssl = not layers.flag("no-ssl-host-verify")
    if not verify_ssl:
        notes.append((logging.WARNING, INSECURE_WARNING))
    effective_bind = bind_address or settings.default_bind_address
    if mode is Mode.SOURCE and not is_loopback_host(effective_bind):
        option = "-b/--local-bind-address" if bind_address else "tunneling.proxy.default_bind_address"
        notes.append((logging.WARNING, exposed_listeners_warning(effective_bind, option)))

    config = ProxyConfig(
        mode=mode,
        access_token=access_token,
        endpoint=endpoint,
        services=services,
        client_token=client_token,
        region=region,
        bind_address=bind_address,
        capath=capath,
        verify_ssl=verify_ssl,
        destination_client_type=_destination_client_type(layers, mode, notes),
        settings=settings,
        https_proxy=https_proxy,
        client_token_file=_client_token_file(layers),
        tunnel_id=_tunnel_id(layers),
        rotate_on_reject=_rotate_on_reject(layers),
        max_rotations=_max_rotations(layers),
        optional_services=optional,
        listen_unmapped=stdio_service is None,
    )
    metrics_port, metrics_bind, log_format = operations_options(
        layers.text("metrics-port"), layers.text("metrics-bind"), layers.text("log-format")
    )
    if metrics_port is not None and not is_loopback_host(metrics_bind):
        notes.append((logging.WARNING, exposed_metrics_warning(metrics_bind)))
    return ParsedCommand(
        config=config, verbosity=verbosity, log_messages=tuple(notes),
        metrics_port=metrics_port, metrics_bind=metrics_bind, log_format=log_format, stdio_service=stdio_service,
    )


def operations_options(port: str | None, bind: str | None, log_format: str | None) -> tuple[int | None, str, str]:
    """Check ``--metrics-port``, ``--metrics-bind``, ``--log-format`` (shared with the agent)."""
    metrics_port = None
    if port is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise UsageError(f"the argument ('{port}') for option '--metrics-port' is invalid")
        metrics_port = int(port)
    if bind is not None:
        validate_host(bind, "Metrics bind address")
        if metrics_port is None:
            raise UsageError("--metrics-bind needs --metrics-port")
    if log_format is not None and log_format not in LOG_FORMATS:
        raise UsageError(f"the argument ('{log_format}') for option '--log-format' is invalid: use reference or json")
    return metrics_port, bind or "127.0.0.1", log_format or "reference"


def _verbosity(value: str | bool, option: str) -> int:
    text = value if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > 255:
        raise UsageError(f"the argument ('{text}') for option '{option}' is invalid")
    return int(text)


def _environment_options(environ: Mapping[str, str]) -> RawOptions:
    names = {
        ENV_ACCESS_TOKEN: "access-token",
        ENV_CLIENT_TOKEN: "client-token",
        ENV_ENDPOINT: "proxy-endpoint",
        ENV_REGION: "region",
    }
    # An empty variable counts as unset (a common shell idiom for "no value").
    return {option: environ[name] for name, option in names.items() if environ.get(name)}


def _choose_endpoint_or_region(layers: _Layers, notes: Notes) -> tuple[str, RawOptions]:
    """The source that names -r or -e and its options (values checked later)."""
    # -r and -e are two ways to say one thing: the highest source naming either
    # decides, and only naming both in the same source is an error.
    for index, (source, options) in enumerate(layers.layers):
        region, endpoint = options.get("region"), options.get("proxy-endpoint")
        if region is None and endpoint is None:
            continue
        if region is not None and endpoint is not None:
            break
        for lower_source, lower in layers.layers[index + 1 :]:
            if "region" in lower or "proxy-endpoint" in lower:
                notes.append((logging.DEBUG, f"Region/endpoint from the {lower_source} ignored: the {source} sets it"))
        return source, options
    raise UsageError("Must specify one and only one of --region/-r or --proxy-endpoint/-e options")


def _endpoint_and_region(
    source: str, options: RawOptions, settings: Settings, notes: Notes
) -> tuple[ServiceEndpoint, str | None]:
    endpoint = options.get("proxy-endpoint")
    if isinstance(endpoint, str):
        notes.append((logging.DEBUG, f"Proxy endpoint from the {source}"))
        return _parse_endpoint(endpoint), None
    region = options.get("region")
    assert isinstance(region, str)
    _validate_region(region)
    notes.append((logging.DEBUG, f"Region from the {source}"))
    return ServiceEndpoint.for_region(region, settings.region_endpoint_overrides), region


def _parse_endpoint(text: str) -> ServiceEndpoint:
    if "://" not in text:
        validate_host(text, "Proxy endpoint")
    try:
        endpoint = ServiceEndpoint.parse(text)
    except UsageError as exc:
        raise UsageError(f"Invalid proxy endpoint '{text}': {exc}") from None
    validate_host(endpoint.host, "Proxy endpoint")
    return endpoint


def _validate_region(region: str) -> None:
    if not region:
        raise UsageError("Region cannot be empty")
    if len(region) > MAX_REGION_LENGTH:
        raise UsageError("Region exceeds maximum allowed length")
    if not _REGION_PATTERN.match(region):
        raise UsageError("Region must contain only lowercase letters, numbers, and hyphens")


def _access_token(layers: _Layers, notes: Notes) -> str:
    token, source = layers.get("access-token")
    assert isinstance(token, str)  # presence is checked first, as boost does
    register_secret(token)
    if not token:
        raise UsageError("Access token cannot be empty")
    if len(token) > MAX_ACCESS_TOKEN_LENGTH:
        raise UsageError("Access token exceeds maximum allowed length")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):
        raise UsageError("Access token contains invalid control characters")
    if source != "environment":
        where = "CLI arg" if source == "command line" else source
        notes.append(
            (
                logging.WARNING,
                f"Found access token supplied via {where}. "
                f"Consider using environment variable {ENV_ACCESS_TOKEN} instead",
            )
        )
    return token


def _client_token(layers: _Layers) -> str | None:
    token = layers.text("client-token")
    if token is None:
        return None
    register_secret(token)
    if not 32 <= len(token) <= 128:
        raise UsageError("Client token must be between 32 and 128 characters")
    if not _CLIENT_TOKEN_PATTERN.match(token):
        raise UsageError("Client token must contain only letters, digits and hyphens (^[a-zA-Z0-9-]{32,128}$)")
    return token


def https_proxy_from_environment(environ: Mapping[str, str], notes: Notes) -> str | None:
    """The web proxy URL of ``https_proxy``/``HTTPS_PROXY`` (password registered as a secret)."""
    name = next((n for n in ENV_HTTPS_PROXY_NAMES if environ.get(n)), None)
    if name is None:
        return None
    value = environ[name]

    def bad(reason: str) -> UsageError:
        return UsageError(f"Failed to parse the value of environment variable {name}: {reason}")

    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unbalanced "[" (IPv6 literal)
        raise bad("not a URL") from None
    # The URL may carry user:password: register before anything else can fail.
    for secret in (parts.password, urllib.parse.unquote(parts.password or "")):
        register_secret(secret)

    if parts.scheme not in ("http", "https"):
        raise bad("expected http://[user:pass@]host[:port] or https://...")
    try:
        port = parts.port
    except ValueError:
        raise bad("invalid port") from None
    if not parts.hostname or port == 0:
        raise bad("missing host" if not parts.hostname else "invalid port")
    notes.append(
        (logging.INFO, "Found Web proxy information in the environment variables, will use it to connect via the proxy.")
    )
    return value


def _check_socket_directories(services: Mapping[str, ServiceTarget]) -> None:
    """Refuse a Unix socket source in an unsafe or missing directory now, before connecting."""
    for service_id, target in services.items():
        if isinstance(target, SourceUnixSocket):
            problem = socket_directory_problem(target.path)
            if problem is not None:
                name = service_id or "(default)"
                raise ConfigError(f"Cannot listen on Unix socket {target.path} for service {name}: {problem}")


def _stdio_service(layers: _Layers) -> str | None:
    service = layers.text("stdio")
    if service:
        try:
            validate_service_id(service)
        except UsageError as exc:
            raise UsageError(f"Invalid service ID for --stdio '{service}': {exc}") from None
    return service


def _mode_and_services(
    layers: _Layers, cwd: str | None, notes: Notes, stdio: str | None = None
) -> tuple[Mode, dict[str, ServiceTarget], frozenset[str]]:
    source_ports = layers.text("source-listen-port")
    destination_apps = layers.text("destination-app")
    mode_text = layers.text("mode")
    mode = Mode.DESTINATION if destination_apps is not None else Mode.SOURCE
    if mode_text is not None:
        if mode_text not in _MODES:
            raise UsageError("Mode value is wrong! Allowed values are: src, dst, source, destination")
        mode = _MODES[mode_text]
    if source_ports is not None and destination_apps is not None:
        raise UsageError("Must specify one and only one of --source-listen-port/-s or --destination-app/-d")
    if stdio is not None and mode is Mode.DESTINATION:
        raise UsageError("--stdio works in source mode only: it cannot be used with -d or --mode dst")
    if source_ports is None and destination_apps is None and mode_text is None and stdio is None:
        raise UsageError("Must specify one of --source-listen-port/-s or --destination-app/-d or --mode")
    if source_ports is not None and mode_text is not None and mode is Mode.DESTINATION:
        raise UsageError("-s and --mode have mismatched mode. Mode is set to destination!")
    if destination_apps is not None and mode_text is not None and mode is Mode.SOURCE:
        raise UsageError("-d and --mode have mismatched mode. Mode is set to source!")

    services: dict[str, ServiceTarget] = {}
    if source_ports is not None:
        services, mapping_notes = parse_mapping(source_ports, mode, "--source-listen-port")
        notes.extend(mapping_notes)
    elif destination_apps is not None:
        services, mapping_notes = parse_mapping(destination_apps, mode, "--destination-app")
        notes.extend(mapping_notes)
    if stdio is not None:
        if stdio in services:
            raise UsageError(f"Service {stdio or '(unnamed)'} is given both to --stdio and to -s: give it to one")
        services[stdio] = InProcess()

    explicit_dir = layers.text("config-dir")
    if stdio is not None and explicit_dir is None:
        # No implicit ./config with --stdio: its mappings would open ports nobody asked for.
        return mode, services, frozenset()
    config_dir = explicit_dir if explicit_dir is not None else os.path.join(cwd or os.getcwd(), "config")
    if V1_SERVICE in services:
        notes.append((logging.DEBUG, "v2 local proxy starts with v1 local proxy format"))
        if explicit_dir is not None:
            notes.append((logging.WARNING, f"--config-dir {explicit_dir} ignored: a single unnamed mapping is given"))
        return mode, services, frozenset()
    from_dir, dir_notes = read_config_dir(config_dir, mode, strict=explicit_dir is not None)
    notes.extend(dir_notes)
    optional = frozenset(sid for sid in from_dir if sid not in services)
    for service_id in optional:
        services[service_id] = from_dir[service_id]
    if mode is Mode.DESTINATION and not services:
        # The reference fails later, at the first stream; say it now.
        raise UsageError(
            "Destination mode needs a service mapping: use --destination-app/-d or --config-dir"
            f" (no mappings found in {config_dir})"
        )
    if mode is Mode.SOURCE and not services:
        notes.append(
            (
                logging.DEBUG,
                "Local proxy does not detect any port mapping configuration. "
                "Will pick up random ports to run in source mode.",
            )
        )
    return mode, services, optional


def _destination_client_type(layers: _Layers, mode: Mode, notes: Notes) -> str | None:
    value = layers.text("destination-client-type")
    if value is None:
        return None
    kind = value.strip().upper()
    if kind not in ("V1", "V2", "V3"):
        raise UsageError(
            f"Invalid --destination-client-type value '{value}': allowed values are V1, V2 (V3 is the default)"
        )
    if mode is Mode.DESTINATION:
        notes.append((logging.WARNING, "--destination-client-type only applies in source mode: ignored"))
        return None
    return None if kind == "V3" else kind


def _client_token_file(layers: _Layers) -> str | None:
    path = layers.text("client-token-file")
    if path is not None:
        validate_path(path, "Client token file path")
    return path


def _tunnel_id(layers: _Layers) -> str | None:
    tunnel_id = layers.text("tunnel-id")
    if tunnel_id is not None and not _TUNNEL_ID_PATTERN.match(tunnel_id):
        raise UsageError("Tunnel id must be 1..128 characters of letters, digits and _-+=:")
    return tunnel_id


def _rotate_on_reject(layers: _Layers) -> bool:
    rotate = layers.flag("rotate-on-reject")
    if rotate and layers.text("tunnel-id") is None:
        raise UsageError("--rotate-on-reject needs --tunnel-id (the tunnel whose token to rotate)")
    return rotate


def _max_rotations(layers: _Layers) -> int:
    text = layers.text("max-rotations")
    if text is None:
        return 3
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > MAX_ROTATIONS_LIMIT:
        raise UsageError(f"the argument ('{text}') for option '--max-rotations' is invalid")
    return int(text)
