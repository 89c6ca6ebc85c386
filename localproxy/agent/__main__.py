"""``python -m localproxy.agent``: the same as the ``localproxy-agent`` command."""

from __future__ import annotations

import sys

from localproxy.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
