"""The websocket side of a proxy: one session to the service (TLS, HTTP CONNECT,
handshake, typed refusals, backoff), the connection's framing, keepalive, and the
sender that turns scheduled messages into websocket writes.

May use the sans-I/O layers (wire, tunnel), tokens, configuration, ops and the bottom.
"""
