"""The bytes on the wire, sans-I/O: tunnel frames (length prefix + protobuf ``Message``,
encoded and decoded by hand) and websocket frames cut from a byte stream.

The hot path. Imports only the bottom (errors); no sockets, no event loop.
"""
