"""``python -m localproxy``: the same as the ``localproxy`` command."""

from __future__ import annotations

import sys

from localproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
