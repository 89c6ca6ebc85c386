"""What running a proxy needs around it: logging (reference format, JSON, redaction),
statistics, the Prometheus exporter, systemd notifications, the event-loop runtime.

May use only the bottom (errors, events, types, settings).
"""
