"""The single refresh, and what Powens' word about an account does to the store.

Owns: the contract's handler (``handler``: read, judge, record), the write rules (``verdict``: judge
and settle, pure) and the one writer every entry point uses (``write``: a batch of outcomes in one
transaction), outcomes as values (``outcomes``), the canonical mapping (``records``), reading Powens
for one account (``shared_read``, ``forced_sync``, ``tokens``) and what a handler needs from outside
(``deps``, ``coordination``).

May import: the foundation modules, ``app.powens``, ``app.store``, ``app.ops``. Never the nightly run,
the push path, the Celery glue or the shell (they call into it).
"""
