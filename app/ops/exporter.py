"""Serving /metrics: one HTTP server per worker (in the parent), prometheus_client multiprocess mode.

Prefork children each write their own mmap files into the directory; the parent's collector sums
them, so one scrape sees the whole worker. One server per child would undercount (each answers
with its own numbers only).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings
from app.ops.refreshed import Refreshed

if TYPE_CHECKING:
    from app.reports.attention import ServiceCounts

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


def serve_beat_metrics(settings: Settings) -> None:
    """Beat (leader and standby alike) also exports what no worker sees: queue depth, connections that
    need their user, accounts by the age of their bank data. The first computation of the counts
    starts with the server, so the first scrape finds them."""
    collector = ServiceCollector(settings)
    serve_worker_metrics(settings, extra=(collector,))
    if settings.metrics_port != 0:
        collector.counts.start_if_due()


class ServiceCollector:
    """The beat's gauges. Queue depth is read at each scrape (a few Redis LLENs). The service counts
    (``app.reports.attention.service_counts``: aggregates over every account and connection) are
    computed at most every BALANCES_GAUGE_REFRESH_SECONDS on a thread of their own; a scrape serves
    the last counts with the time they describe (``balances_service_gauges_computed_timestamp_seconds``)
    and how long they took, so a scrape costs the same at a thousand accounts or ten million and
    staleness is visible (docs/design.md "Observability"). ``clock`` and ``spawn``: ``Refreshed``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        spawn: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.counts: Refreshed[ServiceCounts] = Refreshed(
            "service gauges", self._count, settings.gauge_refresh_seconds, clock=clock, spawn=spawn
        )

    def _count(self, at: float) -> ServiceCounts:
        from sqlalchemy import text

        from app.reports.attention import service_counts
        from app.store.db import session_scope

        with session_scope(self.settings) as session:
            if session.get_bind().dialect.name == "postgresql":
                # Bounded: an aggregate stuck behind a lock (a migration's) must not hold its
                # connection, nor queue others behind it, longer than about a period.
                timeout_ms = int(max(self.settings.gauge_refresh_seconds, 30) * 1000)
                session.execute(text(f"SET LOCAL statement_timeout = {timeout_ms}"))
            return service_counts(session, self.settings, datetime.fromtimestamp(at, UTC))

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "balances_celery_queue_length",
            "Messages waiting in each Celery queue (Redis LLEN).",
            labels=["queue"],
        )
        try:
            import redis

            r = redis.Redis.from_url(
                self.settings.celery_broker_url, socket_timeout=2, socket_connect_timeout=2
            )
            from app.worker.queues import Queue

            for q in Queue:
                # kombu's Redis transport keeps priority sub-queues as "<queue>\x06\x16<n>".
                total = r.llen(q) + sum(r.llen(f"{q}\x06\x16{p}") for p in (3, 6, 9))
                depth.add_metric([q.value], float(total))
        except Exception:  # scrape must not fail because Redis is down; `up` stays 1, depth absent
            log.warning("queue depth unavailable", exc_info=True)
        yield depth

        computed = self.counts.latest()
        if computed is None:  # never computed yet (the database unreadable since start): absent
            return
        counts = computed.value
        yield GaugeMetricFamily(
            "openbanking_connections_needing_user",
            "Bank connections that need a person: a state only the end user can fix (SCA, wrong "
            "password, ...), or a transient state lasting past BALANCES_TRANSIENT_STATE_DAYS.",
            value=float(counts.needing),
        )
        yield GaugeMetricFamily(
            "openbanking_connections_consent_expiring",
            "Active connections whose PSD2 consent ends within BALANCES_CONSENT_WARNING_DAYS.",
            value=float(counts.expiring),
        )
        yield GaugeMetricFamily(
            "openbanking_connections", "Active bank connections.", value=float(counts.connections)
        )
        ages = GaugeMetricFamily(
            "openbanking_accounts_by_data_age",
            "Active accounts by the age of the bank's data (Powens last_update; never: no sync yet).",
            labels=["bucket"],
        )
        for bucket, n in counts.ages.items():
            ages.add_metric([bucket], float(n))
        yield ages
        yield GaugeMetricFamily(
            "balances_service_gauges_computed_timestamp_seconds",
            "Unix time the beat's connection and account gauges describe: when they were last "
            "computed (at most every BALANCES_GAUGE_REFRESH_SECONDS; older: the database could not "
            "be read since).",
            value=computed.at,
        )
        yield GaugeMetricFamily(
            "balances_service_gauges_compute_duration_seconds",
            "How long the last computation of the beat's connection and account gauges took.",
            value=computed.seconds,
        )


def serve_worker_metrics(
    settings: Settings, extra: tuple[object, ...] = (), *, restore_nightly: bool = True
) -> None:
    """Start the one /metrics server of this worker or beat (in the parent, before any fork). The
    webhook receiver passes ``restore_nightly=False``: it never touches the database."""
    if settings.metrics_port == 0:
        return
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    from app.ops import metrics

    if restore_nightly:
        _restore_nightly_gauge(settings, metrics)
    registry = REGISTRY
    if _directory is not None:
        registry = CollectorRegistry()
        CompactingCollector(registry, path=str(_directory))
    for collector in extra:
        registry.register(collector)  # type: ignore[arg-type]
    start_http_server(settings.metrics_port, registry=registry)
    log.info("metrics on :%d/metrics", settings.metrics_port)


class _Compacting:
    """Folds the files of dead children into archive files before each scrape.

    Every prefork child writes ``counter_<pid>.db`` etc.; with ``max_tasks_per_child`` children come
    and go all night, and the directory (and the time a scrape takes) would grow without bound. A
    dead child's counters and histograms are added into ``*_archive.db`` and its files removed, so
    the totals hold and the directory keeps one set of files per live process plus the archive.
    Runs in the scraping thread of the parent, under a lock, so no scrape sees a value twice.
    """

    _lock = threading.Lock()

    @classmethod
    def compact(cls, path: str) -> int:
        from prometheus_client.mmap_dict import MmapedDict

        folded = 0
        with cls._lock:
            for f in sorted(glob.glob(os.path.join(path, "*.db"))):
                m = _FILE_RE.match(os.path.basename(f))
                if m is None or _alive(int(m.group("pid"))):
                    continue
                kind = m.group("kind")
                if kind.startswith("gauge_live"):
                    os.unlink(f)  # a dead process's live gauge is gone by definition
                    continue
                if kind not in _MERGE:
                    continue
                merge = _MERGE[kind]
                archive = MmapedDict(os.path.join(path, f"{kind}_archive.db"))
                try:
                    for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(f):
                        old, _ts = archive.read_value(key)
                        archive.write_value(key, merge(old, value), timestamp)
                finally:
                    archive.close()
                os.unlink(f)
                folded += 1
        return folded


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_FILE_RE = re.compile(r"^(?P<kind>counter|histogram|gauge_[a-z]+)_(?P<pid>\d+)\.db$")
_MERGE: dict[str, Callable[[float, float], float]] = {
    "counter": lambda a, b: a + b,
    "histogram": lambda a, b: a + b,
    "gauge_max": max,
    "gauge_min": min,
    "gauge_sum": lambda a, b: a + b,
}


def _compacting_collector_class() -> type:
    from prometheus_client.multiprocess import MultiProcessCollector

    class CompactingCollectorImpl(MultiProcessCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            _Compacting.compact(self._path)
            return super().collect()

    return CompactingCollectorImpl


def CompactingCollector(registry: object, path: str) -> object:
    """MultiProcessCollector that first folds dead children's files (prometheus_client imported late)."""
    return _compacting_collector_class()(registry, path=path)


def child_exited(pid: int) -> None:
    if _directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path=str(_directory))


def _restore_nightly_gauge(settings: Settings, metrics: object) -> None:
    """A restarted worker would export no nightly-success time and page someone: read it back."""
    try:
        from app.store.runs import last_success

        when = last_success(settings)
    except Exception:  # the schema may not exist yet (before `balances db upgrade`)
        log.warning("could not read the last nightly success from the database", exc_info=True)
        return
    if when is not None:
        metrics.NIGHTLY_LAST_SUCCESS.set(when.timestamp())  # type: ignore[attr-defined]
