"""Configuration: the typed :class:`~localproxy.config.proxy_config.ProxyConfig`, and how
the command line, config files, ``--config-dir`` mappings, the environment and
``--settings-json`` become one.

May use ops (logging set-up, secret registration) and the bottom; nothing that does I/O on the network.
"""
