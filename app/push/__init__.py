"""The push path: Powens webhooks received (``receiver``), verified (``signature``), reduced to what a
refresh reads (``events``), queued, and applied through the refresh's own write path (``apply``).
See docs/design.md "The push path".
"""
