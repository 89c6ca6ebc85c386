"""``python -m localproxy.connect``: the same as ``localproxy connect``."""

import sys

from localproxy.connect.cli import main

sys.exit(main())
