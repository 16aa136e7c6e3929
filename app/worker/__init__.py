"""The Celery glue: thin tasks (``tasks``), their shared base (``taskbase``), the one router
(``queues``) and the beat scheduler (``beat``). Tasks are adapters: they turn a message into a call
of plain code and its result into a Celery action, and hold no business rule.

May import everything below it (refresh, nightly, push, reports, admin, store, ops); never the shell
or the development tools. ``queues`` imports nothing heavy: ``celeryconfig`` loads it.
"""
