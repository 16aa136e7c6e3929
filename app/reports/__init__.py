"""Per-tenant reports computed after a nightly run: summary (``summary``), cashflow forecast
(``forecast``), computing and storing them exactly once (``jobs``), what needs an operator's
attention (``attention``); the report of a whole finished run (``run_report``) and its delivery to the
notification hook (``notify``: a signed POST, one delivery sequence per run). Reads the store; imports
nothing of the refresh or the run's glue.
"""
