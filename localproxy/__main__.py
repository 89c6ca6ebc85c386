"""``python -m localproxy`` and the ``localproxy`` command."""

from __future__ import annotations

import gc
import sys


def main() -> int:
    """:func:`localproxy.cli.main` with the cyclic collector paused while it imports.

    Start-up creates ~100,000 objects that live as long as the process (modules,
    classes, functions); the collector's passes over them while they are made cost
    ~5-10 ms of a proxy's ~40 ms above the interpreter's (issue 21). The CLI resumes
    it once the imports are done, those objects frozen out of its way
    (:func:`localproxy.ops.runtime.resume_collector`).
    """
    if gc.isenabled():
        gc.disable()
        from localproxy.ops import runtime

        runtime.collector_paused = True
    from localproxy.cli import main as cli_main
    from localproxy.ops.runtime import resume_collector

    try:
        return cli_main()
    finally:
        resume_collector()


if __name__ == "__main__":
    sys.exit(main())
