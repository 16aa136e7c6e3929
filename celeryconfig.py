"""Celery configuration (fixed file). Values come from app.config.Settings, never from os.environ here.

Why each setting (docs/design.md "Celery"):
- acks_late + reject_on_worker_lost: a task whose worker dies is redelivered, not lost; the refresh is
  idempotent (one audit row per task id, conditional upserts), so redelivery writes nothing twice.
- prefetch 1: a worker holds at most one unstarted message per process, so nothing waits behind a
  slow refresh and a killed worker strands at most one message.
- visibility_timeout > longest retry countdown + hard time limit: Redis must not redeliver a task
  that is merely waiting for its countdown (validated in Settings).
- queue_order_strategy=priority, queues listed interactive, reports, refresh: on-demand work first,
  then the few short planning/report/sweeper tasks, then the nightly flood (strict priority would
  otherwise starve planning and summaries behind the whole refresh backlog).
- task_routes: one router (app.worker.queues) places every task; no call site names a queue.
"""

from datetime import timedelta

from celery.schedules import crontab, schedule
from kombu import Queue

from app.config import get_settings
from app.schedule import parse as parse_cron
from app.worker.queues import PRUNE_TASK, route, time_limits
from app.worker.queues import Queue as Q

_s = get_settings()

broker_url = _s.celery_broker_url
result_backend = _s.celery_result_backend
result_expires = 3600
task_ignore_result = _s.celery_result_backend is None

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
timezone = _s.timezone
enable_utc = True

task_acks_late = True
task_reject_on_worker_lost = True
# A task killed by its hard time limit goes back to the queue (a redelivery, counted: a message that
# times out on every delivery ends as a recorded failure after BALANCES_MAX_DELIVERIES).
task_acks_on_timeout = False
# Publishing (a retry, a fan-out, a summary) outlasts a short broker outage instead of failing.
task_publish_retry_policy = {"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 3}
worker_prefetch_multiplier = 1
task_soft_time_limit = _s.task_soft_time_limit
task_time_limit = _s.task_time_limit
# Declared per task: planning steps their own (short) limits, the rest the service's.
task_annotations = time_limits(_s)
worker_max_tasks_per_child = 1000
worker_hijack_root_logger = False
worker_send_task_events = False
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _s.visibility_timeout,
    "queue_order_strategy": "priority",
}
result_backend_transport_options = {"visibility_timeout": _s.visibility_timeout}

# Listed in priority order (app.worker.queues.Queue).
task_queues = tuple(Queue(q.value, routing_key=q.value) for q in Q)
task_routes = (route,)
task_default_queue = Q.INTERACTIVE.value
task_default_routing_key = Q.INTERACTIVE.value
task_create_missing_queues = False

imports = ("app.worker.tasks",)

# Beat: RedBeat keeps the schedule and a lock in Redis, so a second beat is a hot standby.
beat_scheduler = "app.worker.beat:BalancesScheduler"  # RedBeat, surviving a Redis restart
redbeat_redis_url = _s.celery_broker_url
redbeat_key_prefix = "balances:redbeat"
redbeat_lock_timeout = _s.redbeat_lock_timeout
beat_max_loop_interval = min(5, max(1, _s.redbeat_lock_timeout // 3))

if _s.nightly_interval_seconds:
    _nightly: schedule = schedule(timedelta(seconds=_s.nightly_interval_seconds))
else:
    _nightly = parse_cron(_s.nightly_cron)

# Evaluated in `timezone` (BALANCES_TIMEZONE): 04:00 Europe/Paris by default (app.schedule: why).
beat_schedule = {
    "nightly-balances-refresh": {
        "task": "balances.start_nightly_run",
        "schedule": _nightly,
    },
    "sweep-nightly-runs": {
        "task": "balances.sweep_runs",
        "schedule": _s.sweep_interval_seconds,
        "options": {"expires": _s.sweep_interval_seconds},
    },
    # Retention (docs/retention.md): 01:30, hours before the nightly run (04:00 by default) and after
    # the day's operators; a tick no worker ran within 6 h is dropped (the next day's resumes).
    "prune-history": {
        "task": PRUNE_TASK,
        "schedule": crontab(minute=30, hour=1),
        "options": {"expires": 6 * 3600},
    },
}
