"""The local side of a proxy: listeners (TCP, Unix sockets) in source mode and
connectors to the local application in destination mode, as asyncio protocols.

May use the sans-I/O layers, configuration, ops and the bottom; never the websocket side.
"""
