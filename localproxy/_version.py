"""The package's version, in one place (``localproxy --version``, the websocket User-Agent)."""

__version__ = "0.1.0"
