"""Serving /metrics: one HTTP server per worker (in the parent), prometheus_client multiprocess mode.

Prefork children each write their own mmap files into the directory; the parent's collector sums
them, so one scrape sees the whole worker. One server per child would undercount (each answers
with its own numbers only).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from app.config import Settings

log = logging.getLogger(__name__)
ENV = "PROMETHEUS_MULTIPROC_DIR"

_directory: Path | None = None


def prepare_multiprocess(settings: Settings) -> Path | None:
    """Wipe and select the directory. Must run before prometheus_client is first imported."""
    global _directory
    if _directory is not None or settings.metrics_port == 0:
        return _directory
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client imported before the worker chose its directory; not multiprocess")
        return None
    directory = settings.metrics_directory
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # prometheus_client reads this itself when it chooses its value class (at import); children
    # forked later inherit it.
    os.environ[ENV] = str(directory)
    _directory = directory
    return directory


def serve_worker_metrics(settings: Settings) -> None:
    """Start the one /metrics server of this worker or beat (in the parent, before any fork)."""
    if settings.metrics_port == 0:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from app import metrics

    _restore_nightly_gauge(settings, metrics)
    if _directory is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(_directory))
        start_http_server(settings.metrics_port, registry=registry)
    else:
        start_http_server(settings.metrics_port)
    log.info("metrics on :%d/metrics", settings.metrics_port)


def child_exited(pid: int) -> None:
    if _directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path=str(_directory))


def _restore_nightly_gauge(settings: Settings, metrics: object) -> None:
    """A restarted worker would export no nightly-success time and page someone: read it back."""
    try:
        from app.pipeline import last_success

        when = last_success(settings)
    except Exception:  # the schema may not exist yet (before `balances db upgrade`)
        log.warning("could not read the last nightly success from the database", exc_info=True)
        return
    if when is not None:
        metrics.NIGHTLY_LAST_SUCCESS.set(when.timestamp())  # type: ignore[attr-defined]
