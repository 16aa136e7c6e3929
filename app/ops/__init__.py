"""What operators observe: Prometheus metrics (``metrics``) and their exporter (``exporter``), JSON
logs with secrets scrubbed (``logs``), telemetry events with PII masked (``telemetry``).

``metrics``, ``logs`` and ``telemetry`` are imported from every layer and import none of the domain
packages; ``exporter`` (the /metrics server and the beat's gauges) reads the store and the reports.
"""
