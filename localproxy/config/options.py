"""Command-line syntax of the reference proxy (boost::program_options), reproduced.

This module only knows the option table and how tokens become ``name -> value``
pairs: from argv (:func:`parse_argv`) and from ``--config`` files
(:func:`parse_config_text`). Error texts are boost's, because test rigs and
users grep for them. What the values mean is decided in ``localproxy.config.command_line``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Mapping, Sequence

from localproxy.errors import ConfigError, UsageError
from localproxy.ops.files import MAX_CONFIG_BYTES, read_user_text
from localproxy.records import record

# name -> value; flags (no argument) map to True.
RawOptions = dict[str, "str | bool"]

TRY_HELP = "Try 'localproxy --help' for a list of options."


@record(frozen=True)
class OptionSpec:
    """One option: long name (the key everywhere), short letter, value or flag."""

    name: str
    short: str | None
    takes_value: bool
    help: str
    default_text: str = ""  # shown in --help as "(=4)"
    in_config_file: bool = True  # may appear in a --config file


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("help", "h", False, "Show help message", in_config_file=False),
    OptionSpec("version", "V", False, "Show version information and exit", in_config_file=False),
    OptionSpec("access-token", "t", True, "Client access token"),
    OptionSpec("client-token", "i", True, "Optional Client Token"),
    OptionSpec(
        "proxy-endpoint",
        "e",
        True,
        "Endpoint of proxy server with port (if not default 443). Example: "
        "data.tunneling.iot.us-east-1.amazonaws.com:443 (also accepted: "
        "wss://host[:port] or ws://host[:port])",
    ),
    OptionSpec(
        "region",
        "r",
        True,
        "Endpoint region where tunnel exists. Mutually exclusive flag with --proxy-endpoint",
    ),
    OptionSpec(
        "source-listen-port",
        "s",
        True,
        "Sets the mappings between source listening ports and service identifier. "
        "Example: SSH1=5555 or 5555 (0 picks a free port); a value containing '/' is a Unix "
        "socket path, created with mode 0600 (SSH1=/run/user/1000/ssh.sock)",
    ),
    OptionSpec(
        "destination-app",
        "d",
        True,
        "Sets the mappings between the endpoint(address:port/port) and service identifier. "
        "Example: SSH1=127.0.0.1:22 or 22; an endpoint containing '/' is a Unix socket path",
    ),
    OptionSpec(
        "local-bind-address",
        "b",
        True,
        "Assigns a specific local address to bind to for listening in source mode or a "
        "local socket address for destination mode.",
    ),
    OptionSpec(
        "capath",
        "c",
        True,
        "Adds the directory containing certificate authority files to be used for "
        "performing verification",
    ),
    OptionSpec("no-ssl-host-verify", "k", False, "Turn off SSL host verification"),
    OptionSpec(
        "export-default-settings",
        None,
        True,
        "Exports the default settings for the TCP adapter to the given file as json and "
        "exit program",
        in_config_file=False,
    ),
    OptionSpec("settings-json", None, True, "Use the input JSON file to apply fine grained settings."),
    OptionSpec(
        "config",
        None,
        True,
        "Use the supplied configuration file to apply CLI args. Actual CLI args override "
        "the contents of this file",
        in_config_file=False,
    ),
    OptionSpec(
        "verbose",
        "v",
        True,
        "Logging level to standard out. [0, 255] (0=off, 1=fatal, 2=error, 3=warning, "
        "4=info, 5=debug, >=6=trace)",
        default_text="4",
    ),
    OptionSpec(
        "mode", "m", True, "The mode local proxy will run: src(source) or dst(destination)"
    ),
    OptionSpec(
        "destination-client-type",
        "y",
        True,
        "Backward compatibility with an older destination (source mode only): V1 or V2",
    ),
    OptionSpec(
        "config-dir",
        None,
        True,
        "Set the configuration directory where service identifier mappings are stored. "
        "If not specified, will read mappings from the directory ./config if it exists",
    ),
    # Beyond the reference: client-token persistence and access-token rotation.
    OptionSpec(
        "client-token-file",
        None,
        True,
        "File keeping the client token: read it if present, else generate one and save it",
    ),
    OptionSpec("tunnel-id", None, True, "Tunnel id, needed to rotate the access token"),
    OptionSpec(
        "rotate-on-reject",
        None,
        False,
        "When the service refuses a spent access token, rotate it (needs AWS credentials)",
    ),
    OptionSpec(
        "max-rotations",
        None,
        True,
        "Most access-token rotations before giving up",
        default_text="3",
    ),
    # Beyond the reference: operations (issue 14).
    OptionSpec(
        "metrics-port",
        None,
        True,
        "Serve Prometheus metrics on http://BIND:PORT/metrics (needs localproxy[metrics]; 0 picks a port)",
    ),
    OptionSpec("metrics-bind", None, True, "Address the metrics server listens on", default_text="127.0.0.1"),
    # Beyond the reference: a source without a TCP port (issue 19).
    OptionSpec(
        "stdio",
        None,
        True,
        "Source mode: carry one connection to service SERVICE over standard input/output "
        "(e.g. an ssh ProxyCommand), no listening port; logs go to standard error; exits when "
        "either side ends. Example: --stdio SSH",
        in_config_file=False,
    ),
    OptionSpec("log-format", None, True, "Log lines: reference or json (one JSON object per line)",
               default_text="reference"),
)

BY_NAME: Mapping[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}
BY_SHORT: Mapping[str, OptionSpec] = {spec.short: spec for spec in OPTIONS if spec.short}


def parse_argv(argv: Sequence[str]) -> RawOptions:
    """Tokens -> options, with boost's rules and messages.

    ``--name value``, ``--name=value``, unique prefixes of long names,
    ``-x value``, ``-xvalue``, grouped flags (``-kv5``). A value-taking option
    followed by a known option is missing its argument. An option given twice is
    an error.
    """
    options: RawOptions = {}
    pending = list(argv)
    while pending:
        token = pending.pop(0)
        if token == "--":
            if pending:
                raise UsageError("too many positional options have been specified on the command line")
            break
        if token.startswith("--") and len(token) > 2:
            name, has_equal, adjacent = token[2:].partition("=")
            spec = _find_long(name, token)
            if has_equal and not adjacent:
                raise UsageError(
                    f"the argument for option '--{spec.name}' should follow immediately after the equal sign"
                )
            value: str | bool
            if not spec.takes_value:
                if has_equal:
                    raise UsageError(f"option '--{spec.name}' does not take any arguments")
                value = True
            else:
                value = adjacent if has_equal else _next_value(spec, pending)
            _store(options, spec, value, "--")
        elif token.startswith("-") and len(token) > 1:
            _parse_short_group(token, pending, options)
        else:
            raise UsageError("too many positional options have been specified on the command line")
    return options


def _parse_short_group(token: str, pending: list[str], options: RawOptions) -> None:
    rest = token[1:]
    while rest:
        letter, rest = rest[0], rest[1:]
        spec = BY_SHORT.get(letter)
        if spec is None:
            # boost names the whole original token of an unknown option.
            raise UsageError(f"unrecognised option '{token}'")
        if not spec.takes_value:
            _store(options, spec, True, "--")
            continue  # the rest of a sticky group is more short options
        _store(options, spec, rest if rest else _next_value(spec, pending), "--")
        return


def _find_long(name: str, token: str) -> OptionSpec:
    if name in BY_NAME:
        return BY_NAME[name]
    candidates = sorted(spec.name for spec in OPTIONS if spec.name.startswith(name))
    if len(candidates) == 1:
        return BY_NAME[candidates[0]]
    if not candidates:
        raise UsageError(f"unrecognised option '{token}'")
    alternatives = ", ".join(f"'--{c}'" for c in candidates[:-1]) + f", and '--{candidates[-1]}'"
    raise UsageError(f"option '--{name}' is ambiguous and matches {alternatives}")


def _is_known_option(token: str) -> bool:
    if token.startswith("--") and len(token) > 2:
        name = token[2:].partition("=")[0]
        return name in BY_NAME or any(spec.name.startswith(name) for spec in OPTIONS)
    return len(token) == 2 and token[0] == "-" and token[1] in BY_SHORT


def _next_value(spec: OptionSpec, pending: list[str]) -> str:
    if not pending or _is_known_option(pending[0]):
        raise UsageError(f"the required argument for option '--{spec.name}' is missing")
    return pending.pop(0)


def _store(options: RawOptions, spec: OptionSpec, value: str | bool, prefix: str) -> None:
    if spec.name in options:
        raise UsageError(f"option '{prefix}{spec.name}' cannot be specified more than once")
    options[spec.name] = value


# What a config-file key may look like to be quoted in an error: option-shaped
# (lower-case words and hyphens, an optional [section] prefix) and shorter than
# the shortest client token (32), so no token can pass for one.
_OPTION_NAME = re.compile(r"[a-z][a-z-]*(\.[a-z][a-z-]*)?")
_MAX_SHOWN_NAME = 31
_TRUE_WORDS = frozenset({"", "1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_config_text(text: str, source: str) -> RawOptions:
    """A ``--config`` file: ``key = value`` lines with long option names.

    As boost's parser: ``#`` starts a comment anywhere on a line, ``[section]``
    prefixes the following keys, flags take true/false/yes/no/on/off/1/0. Errors
    name the line number and, when it is shaped like one, the option name; never
    a value nor the line (``access-token: AQGA...`` is a line holding a token).
    """
    options: RawOptions = {}
    prefix = ""
    for number, raw_line in enumerate(text.splitlines(), start=1):
        where = f"line {number} of {source}"
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            prefix = line[1:-1].strip() + "."
            continue
        name, has_equal, value = line.partition("=")
        name = prefix + name.strip()
        if not has_equal or name == prefix:
            raise ConfigError(f"the options configuration file contains an invalid line ({where})")
        if not _option_shaped(name):
            raise UsageError(f"unrecognised option ({where}; not an option name, so not shown)")
        spec = BY_NAME.get(name)
        if spec is None:
            raise UsageError(f"unrecognised option '{name}' ({where})")
        if not spec.in_config_file:
            raise UsageError(f"option '{name}' cannot be used in a --config file ({source})")
        value = value.strip()
        if spec.takes_value:
            _store(options, spec, value, "")
            continue
        word = value.lower()
        if word not in _TRUE_WORDS | _FALSE_WORDS:
            raise UsageError(
                f"the argument for option '{name}' is invalid ({where}): "
                "use true, false, yes, no, on, off, 1 or 0"
            )
        if word in _TRUE_WORDS:
            _store(options, spec, True, "")
    return options


def _option_shaped(name: str) -> bool:
    return len(name) <= _MAX_SHOWN_NAME and _OPTION_NAME.fullmatch(name) is not None


def read_config_file(path: str) -> RawOptions:
    """Read and parse a ``--config`` file; an unreadable, non-regular (FIFO, device)
    or oversized file raises :class:`ConfigError`."""
    return parse_config_text(read_user_text(path, "config file", MAX_CONFIG_BYTES), path)


def help_text() -> str:
    """The ``--help`` text, laid out like boost's ``options_description``."""
    lines = ["Allowed options:"]
    columns = []
    for spec in OPTIONS:
        names = f"-{spec.short} [ --{spec.name} ]" if spec.short else f"--{spec.name}"
        if spec.takes_value:
            names += " arg"
            if spec.default_text:
                names += f" (={spec.default_text})"
        columns.append((f"  {names}", spec.help))
    width = min(max(len(left) for left, _ in columns) + 1, 40)
    for left, description in columns:
        wrapped = textwrap.wrap(description, 80 - width, break_on_hyphens=False, break_long_words=False) or [""]
        if len(left) >= width:
            lines.append(left)
            lines.extend(" " * width + part for part in wrapped)
        else:
            lines.append(left.ljust(width) + wrapped[0])
            lines.extend(" " * width + part for part in wrapped[1:])
    return "\n".join(lines) + "\n"
