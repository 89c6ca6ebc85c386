"""``localproxy connect THING SERVICE``: reach a device in one command (an ssh ProxyCommand).

``cli.py`` is the command (it attaches to the shared source, starting it if needed);
``server.py`` the shared source; ``source.py`` the tunnel and source-proxy logic;
``control.py`` the boto3 calls; ``plan.py`` the sans-I/O decisions; ``attach.py`` the
client/server line protocol; ``paths.py`` the private runtime directory.
"""

from localproxy.connect.cli import main

__all__ = ["main"]
