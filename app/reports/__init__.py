"""Per-tenant reports computed after a nightly run: summary (``summary``), cashflow forecast
(``forecast``), computing and storing them exactly once (``jobs``), what needs an operator's
attention (``attention``). Reads the store; imports nothing of the refresh or the run's glue.
"""
