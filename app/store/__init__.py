"""Persistence: engine per process, tables, migrations, queries. Knows nothing of HTTP."""
