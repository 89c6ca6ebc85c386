"""Entry of the shared server process (``--serve``): logging, the server, its readiness line."""

from __future__ import annotations

import argparse
import os
import sys

from localproxy.connect.attach import Reply
from localproxy.connect.paths import shared_paths
from localproxy.connect.server import SharedServer
from localproxy.connect.source import SourceOptions
from localproxy.errors import ExitCode, LocalProxyError
from localproxy.ops.logs import setup_logging
from localproxy.ops.runtime import run_program


def serve_main(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, sys.stderr)  # stderr is the log file the client opened
    announced = False

    def announce(reply: Reply) -> None:
        nonlocal announced
        if announced:
            return
        announced = True
        sys.stdout.buffer.write(reply.encode())
        sys.stdout.flush()
        # Leave the client's pipe: it stops reading once we are ready.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    try:
        api_url = os.environ.get("AWS_ENDPOINT_URL")
        paths = shared_paths(args.thing, args.region, args.proxy_endpoint, api_url)
        options = SourceOptions(
            args.thing, args.region, args.proxy_endpoint, api_url, args.tunnel_minutes, str(paths.last_tunnel)
        )
        server = SharedServer(options, paths, args.idle_exit)
        return int(run_program(server.serve(announce)))
    except LocalProxyError as exc:
        announce(Reply(error=str(exc), code=exc.exit_code))
        return exc.exit_code
    except BaseException as exc:
        announce(Reply(error=f"internal error in the shared source: {exc!r}", code=ExitCode.INTERNAL))
        raise
