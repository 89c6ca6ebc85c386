""":class:`~localproxy.proxy.local_proxy.LocalProxy`: one websocket session wired to the
local side. The engine carries out the tunnel's actions; the receiver feeds it messages.

May use every layer below (websocket, local, tokens, config, tunnel, wire, ops, bottom); no face.
"""
