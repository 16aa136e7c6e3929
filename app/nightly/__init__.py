"""The nightly run: planning, fan-out in batches of whole Powens users, sweeping.

Owns: the run's orchestration (``pipeline``: start, plan, publish pages, sweep; callbacks instead of
Celery), and the batch refresh (``batch``: a few dozen accounts of whole Powens users, one read per
user, recorded through ``app.refresh.write``; ``split_by_user``; a batch hit by a bug handed to the
single refresh).

May import: the foundation modules, ``app.powens``, ``app.store``, ``app.refresh``, ``app.ops``.
"""
