"""Persistence: engine per process (``db``), tables (``models``), status vocabularies and moves
(``states``), the write path's set-based statements (``writes``, over ``recordset``, the one dialect
seam), the nightly run's state (``runs``, ``recovery``; its report's delivery: ``run_reports``), the
one registration path (``registry``), other queries (``repo``, ``external``), secrets at rest
(``secrets``), how long the history tables keep their rows (``retention``) and the snapshots' monthly
partitions (``partitions``), migrations.

Knows SQL, nothing of HTTP or Celery: imports the foundation modules, ``app.ops``, and Powens'
payload models (``registry`` maps them), never the Powens client.
"""
