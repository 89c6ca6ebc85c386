"""The tunnel state machine and its scheduling policy, sans-I/O: service ids, streams,
connection ids, V1/V2/V3 rules, stale-stream filtering, the fair scheduler and pacer.

Fed messages and local events, it returns actions. Imports the wire codec and the
bottom (types, settings, events, errors); no sockets, no event loop, no configuration layer.
"""
