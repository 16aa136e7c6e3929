"""What operators observe: Prometheus metrics and their exporter, JSON logs, telemetry events."""
