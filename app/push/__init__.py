"""The push path: Powens webhooks received (``receiver``), verified (``signature``), reduced to what a
refresh reads (``events``), queued, and applied through the refresh's own write path (``apply``).
See docs/design.md "The push path".

May import: the foundation modules, ``app.powens``, ``app.ops``; ``apply`` also ``app.store`` and
``app.refresh``. The receiver, the one internet-facing process, holds no database URL: it imports
neither the store nor the refresh (only the Celery app, to publish).
"""
