"""``localproxy`` command: a drop-in for the reference C++ local proxy's CLI.

Parsing lives in ``localproxy.config.command_line`` (:func:`parse_command_line`), syntax in
``localproxy.config.options``; this module prints, sets up logging and runs the engine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

from localproxy._version import __version__
from localproxy.config.command_line import ParsedCommand, parse_command_line
from localproxy.config.options import TRY_HELP, help_text
from localproxy.config.settings_json import export_settings
from localproxy.errors import ExitCode, LocalProxyError, UsageError
from localproxy.ops.logs import redact, setup_logging
from localproxy.ops.runtime import defer_import, resume_collector, run_program

__all__ = ["main", "parse_command_line", "ParsedCommand", "version_text"]

log = logging.getLogger("localproxy.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy as the ``localproxy`` command would; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["connect"]:  # ``localproxy connect THING SERVICE`` (no reference flag is a bare word)
        from localproxy.connect.cli import main as connect_main

        resume_collector()  # it runs for as long as the ssh session

        return connect_main(arguments[1:])
    try:
        parsed = parse_command_line(arguments, os.environ)
    # These messages never hold a token and must stay exact; redact() is the
    # belt and braces (a token already registered would still be masked).
    except UsageError as exc:
        print(redact(str(exc)), file=sys.stderr)
        print(TRY_HELP, file=sys.stderr)
        return ExitCode.USAGE
    except LocalProxyError as exc:  # unreadable or malformed files
        print(redact(str(exc)), file=sys.stderr)
        return exc.exit_code

    if parsed.show_help:
        sys.stdout.write(help_text())
        return ExitCode.OK
    if parsed.show_version:
        sys.stdout.write(version_text())
        return ExitCode.OK
    if parsed.export_settings_path is not None:
        try:
            export_settings(parsed.export_settings_path)
        except LocalProxyError as exc:
            print(str(exc), file=sys.stderr)
            return exc.exit_code
        return ExitCode.OK

    stdio = parsed.stdio_service is not None
    # --stdio: standard output carries the connection's bytes, so every log line goes to stderr.
    setup_logging(parsed.verbosity, sys.stderr if stdio else None, log_format=parsed.log_format)
    for level, message in parsed.log_messages:
        log.log(level, "%s", message)
    assert parsed.config is not None
    defer_unused_imports()
    try:
        from localproxy.ops.operations import OpsOptions
        from localproxy.serve import run_proxy, run_stdio
    except ImportError as exc:
        log.critical("The proxy engine (localproxy.proxy.local_proxy) cannot be loaded: %s", exc)
        return ExitCode.INTERNAL
    resume_collector()  # the imports are done (see localproxy/__main__.py)
    try:
        operations = OpsOptions(parsed.metrics_port, parsed.metrics_bind)
        if parsed.stdio_service is not None:
            return int(run_program(run_stdio(parsed.config, parsed.stdio_service, operations), tune_memory=False))
        return int(run_program(run_proxy(parsed.config, operations), tune_memory=False))
    except KeyboardInterrupt:
        return ExitCode.OK
    except LocalProxyError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except Exception:  # a bug: say so, with the traceback (redacted by the filter)
        log.critical("Internal error, please report it", exc_info=True)
        return ExitCode.INTERNAL


# websockets imports these at start-up (~20 ms and ~2 MiB on a small machine, issue 13)
# but only uses them in its dev builds (version) and for proxy=True (we pass the proxy).
DEFERRED_IMPORTS = ("importlib.metadata", "urllib.request")


def _token_bytes(nbytes: int | None = None) -> bytes:
    """``secrets.token_bytes``: ``os.urandom`` (secrets' SystemRandom.randbytes is that)."""
    return os.urandom(32 if nbytes is None else nbytes)


def answered_imports() -> dict[str, dict[str, object]]:
    """Modules whose one use on the run path is answered without loading them (issue 21).

    ``uuid`` (websockets imports it) calls only ``platform.system()`` (~2 ms of import);
    websockets uses only ``secrets.token_bytes`` and ``hashlib.sha1`` (the handshake's
    key, and masks), which pull in ``hmac`` and OpenSSL's digest table (~2 ms, ~0.6 MiB).
    Each answer is what the module's own function does; anything else loads the module.
    """
    answers: dict[str, dict[str, object]] = {"secrets": {"token_bytes": _token_bytes}}
    if hasattr(os, "uname"):  # POSIX: platform.system() is uname's sysname
        answers["platform"] = {"system": lambda: os.uname().sysname}
    try:  # a build without the builtin sha1 (OpenSSL only) keeps hashlib as it is
        from _sha1 import sha1  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        answers["hashlib"] = {"sha1": sha1}
    return answers


def defer_unused_imports() -> None:
    """Load :data:`DEFERRED_IMPORTS` and :func:`answered_imports` only if something uses
    more of them (``runtime.defer_import``)."""
    for name in DEFERRED_IMPORTS:
        defer_import(name)
    for name, answers in answered_imports().items():
        defer_import(name, answers)


def version_text() -> str:
    """``localproxy-python X.Y.Z`` then the versions that matter in a bug report."""
    import platform
    import ssl
    from importlib import metadata

    parts = [f"python {platform.python_version()}", ssl.OPENSSL_VERSION]
    for package in ("websockets", "uvloop"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"localproxy-python {__version__}\n{', '.join(parts)}\n"
