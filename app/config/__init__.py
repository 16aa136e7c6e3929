"""Settings: the one place that reads the environment.

Every other module receives a ``Settings`` (or calls :func:`get_settings`). The names of the variables
are fixed interfaces (README "Configuration"); the ``BALANCES_*`` tuning knobs are ours.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.config import values

DEFAULT_DATABASE_URL = "sqlite:///balances.db"
# Settings kept in a file of the working directory, below the process environment (which wins):
# ``balances demo`` writes the keys of its database there, so every command run beside that database
# (the default ``balances.db`` of the same directory) can read and write it.
ENV_FILE = "balances.env"


class ConfigError(RuntimeError):
    """A variable is missing or malformed. The message names the variable, never its value."""


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, frozen=True, env_file=ENV_FILE, env_file_encoding="utf-8"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """``balances.env`` holds the settings of the embedded database beside it: it applies only
        when the environment names no database. With DATABASE_URL set (production, a shell pointed at
        another database from that directory) its keys and addresses would be another database's."""
        if "DATABASE_URL" in os.environ:
            return init_settings, env_settings, file_secret_settings
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    database_url: str = Field(DEFAULT_DATABASE_URL, validation_alias=_env("DATABASE_URL"))
    celery_broker_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("CELERY_BROKER_URL"))
    celery_result_backend: str | None = Field(None, validation_alias=_env("CELERY_RESULT_BACKEND"))

    powens_domain: str | None = Field(None, validation_alias=_env("POWENS_DOMAIN"))
    powens_base_url_override: str | None = Field(None, validation_alias=_env("POWENS_BASE_URL"))
    powens_client_id: str | None = Field(None, validation_alias=_env("POWENS_CLIENT_ID"))
    powens_client_secret: SecretStr | None = Field(None, validation_alias=_env("POWENS_CLIENT_SECRET"))
    # Powens sends naive datetimes in its own zone; we store UTC.
    powens_timezone: str = Field("Europe/Paris", validation_alias=_env("BALANCES_POWENS_TIMEZONE"))
    powens_connect_timeout: float = Field(3.05, gt=0, validation_alias=_env("BALANCES_HTTP_CONNECT_TIMEOUT"))
    powens_read_timeout: float = Field(20.0, gt=0, validation_alias=_env("BALANCES_HTTP_READ_TIMEOUT"))
    powens_total_timeout: float = Field(30.0, gt=0, validation_alias=_env("BALANCES_HTTP_TOTAL_TIMEOUT"))
    powens_max_body_bytes: int = Field(
        20 * 2**20, ge=1024, validation_alias=_env("BALANCES_POWENS_MAX_BODY_BYTES")
    )
    powens_webview_lang: str = Field("en", validation_alias=_env("BALANCES_WEBVIEW_LANG"))
    powens_redirect_uri: str | None = Field(None, validation_alias=_env("BALANCES_WEBVIEW_REDIRECT_URI"))

    encryption_key: SecretStr | None = Field(None, validation_alias=_env("BALANCES_ENCRYPTION_KEY"))
    # HMAC key(s) of task messages (app.signing), comma-separated, newest first.
    signing_key: SecretStr | None = Field(None, validation_alias=_env("BALANCES_SIGNING_KEY"))
    # The webhook receiver's own key: it signs pushes (balances.apply_push) and nothing else, so the
    # internet-facing receiver never holds the key every other task is signed with.
    push_signing_key: SecretStr | None = Field(None, validation_alias=_env("BALANCES_PUSH_SIGNING_KEY"))
    metrics_port: int = Field(9464, ge=0, le=65535, validation_alias=_env("BALANCES_METRICS_PORT"))
    metrics_dir: str | None = Field(None, validation_alias=_env("BALANCES_METRICS_DIR"))

    # Retries of one refresh (ContractSpec's sample workflow: 3 attempts, exponential from 1 s).
    max_attempts: int = Field(3, ge=1, le=20, validation_alias=_env("BALANCES_MAX_ATTEMPTS"))
    retry_base_seconds: float = Field(1.0, gt=0, validation_alias=_env("BALANCES_RETRY_BASE_SECONDS"))
    retry_cap_seconds: float = Field(300.0, gt=0, validation_alias=_env("BALANCES_RETRY_CAP_SECONDS"))
    force_sync_quota: int = Field(4, ge=0, validation_alias=_env("BALANCES_FORCE_SYNC_QUOTA"))
    task_soft_time_limit: int = Field(120, ge=1, validation_alias=_env("BALANCES_TASK_SOFT_TIME_LIMIT"))
    task_time_limit: int = Field(150, ge=1, validation_alias=_env("BALANCES_TASK_TIME_LIMIT"))
    # How long Redis waits before redelivering a message a dead worker held (> longest countdown).
    visibility_timeout: int = Field(900, ge=60, validation_alias=_env("BALANCES_VISIBILITY_TIMEOUT"))
    # A message redelivered this many times (its worker died each time: a poison message) ends terminal.
    max_deliveries: int = Field(5, ge=1, validation_alias=_env("BALANCES_MAX_DELIVERIES"))
    # Database/broker/Redis errors inside a task re-queue it with backoff up to this cap, this many times.
    infra_retry_cap_seconds: float = Field(
        60.0, gt=0, validation_alias=_env("BALANCES_INFRA_RETRY_CAP_SECONDS")
    )
    infra_max_requeues: int = Field(60, ge=1, validation_alias=_env("BALANCES_INFRA_MAX_REQUEUES"))

    # Business calendar: which day a snapshot belongs to, when the nightly run fires.
    timezone: str = Field("Europe/Paris", validation_alias=_env("BALANCES_TIMEZONE"))
    # 04:00 exists exactly once every day in Europe/Paris (02:00-03:00 does not, in March and October).
    nightly_cron: str = Field("0 4 * * *", validation_alias=_env("BALANCES_NIGHTLY_CRON"))

    # Nightly pipeline (issue: beat fan-out -> refresh -> summary -> forecast).
    nightly_interval_seconds: int | None = Field(
        None, ge=1, validation_alias=_env("BALANCES_NIGHTLY_INTERVAL_SECONDS")
    )  # replaces the crontab when set (development, tests)
    sweep_interval_seconds: float = Field(
        60.0, gt=0, validation_alias=_env("BALANCES_SWEEP_INTERVAL_SECONDS")
    )
    # A running run whose items stop finishing for this long is re-driven (its pending items published
    # again under the same task ids); the deadline below is only the last resort.
    run_stall_seconds: float = Field(300.0, gt=0, validation_alias=_env("BALANCES_RUN_STALL_SECONDS"))
    max_redrives: int = Field(10, ge=1, validation_alias=_env("BALANCES_MAX_REDRIVES"))
    run_deadline_seconds: float = Field(7200.0, gt=0, validation_alias=_env("BALANCES_RUN_DEADLINE_SECONDS"))
    run_grace_seconds: float = Field(900.0, gt=0, validation_alias=_env("BALANCES_RUN_GRACE_SECONDS"))
    # False behind PgBouncer in transaction mode (no server-side prepared statements).
    db_prepared_statements: bool = Field(True, validation_alias=_env("BALANCES_DB_PREPARED_STATEMENTS"))
    plan_batch_size: int = Field(1000, ge=1, le=10000, validation_alias=_env("BALANCES_PLAN_BATCH_SIZE"))
    # Planning in steps (app.nightly.pipeline): each step writes and publishes one page of accounts,
    # under its own time limits; the live planner's lease is renewed by every step; the fan-out waits
    # while the refresh queue holds this many accounts (the broker holds minutes of work, not the night).
    plan_page_accounts: int = Field(
        2000, ge=1, le=100_000, validation_alias=_env("BALANCES_PLAN_PAGE_ACCOUNTS")
    )
    plan_soft_time_limit: float = Field(30.0, gt=0, validation_alias=_env("BALANCES_PLAN_SOFT_TIME_LIMIT"))
    plan_time_limit: float = Field(45.0, gt=0, validation_alias=_env("BALANCES_PLAN_TIME_LIMIT"))
    plan_lease_seconds: float = Field(300.0, gt=0, validation_alias=_env("BALANCES_PLAN_LEASE_SECONDS"))
    plan_queue_accounts: int = Field(100_000, ge=1, validation_alias=_env("BALANCES_PLAN_QUEUE_ACCOUNTS"))
    plan_wait_seconds: float = Field(5.0, gt=0, validation_alias=_env("BALANCES_PLAN_WAIT_SECONDS"))
    # A nightly refresh message carries the accounts of whole Powens users, at most this many (a user
    # with more accounts alone); its worker reads up to ``readers`` users from Powens at once. Chosen
    # by measurement (docs/performance.md): shorter batches keep an operator's refresh from waiting
    # behind them; 16 readers read a 50-account batch's users in one Powens round trip.
    refresh_batch_accounts: int = Field(
        50, ge=1, le=2000, validation_alias=_env("BALANCES_REFRESH_BATCH_ACCOUNTS")
    )
    refresh_batch_readers: int = Field(
        16, ge=1, le=64, validation_alias=_env("BALANCES_REFRESH_BATCH_READERS")
    )
    redbeat_lock_timeout: int = Field(30, ge=2, validation_alias=_env("BALANCES_REDBEAT_LOCK_TIMEOUT"))

    # Coordination between workers: Redis (production), or in-process (the demo without services).
    redis_url_override: str | None = Field(None, validation_alias=_env("BALANCES_REDIS_URL"))
    coordination: str = Field(
        "redis", pattern="^(redis|local)$", validation_alias=_env("BALANCES_COORDINATION")
    )
    powens_rate_limit: float = Field(10.0, ge=0, validation_alias=_env("BALANCES_POWENS_RATE_LIMIT"))
    rate_limit_max_wait: float = Field(2.0, ge=0, validation_alias=_env("BALANCES_RATE_LIMIT_MAX_WAIT"))
    lock_wait_seconds: float = Field(10.0, gt=0, validation_alias=_env("BALANCES_LOCK_WAIT_SECONDS"))
    # Locks held while working are leases renewed every third of this: a killed holder frees them
    # within one lease, a long piece of work never loses them.
    lock_lease_seconds: float = Field(15.0, ge=1, validation_alias=_env("BALANCES_LOCK_LEASE_SECONDS"))
    # Each worker's lease on the messages it holds (app.worker.liveness), renewed every third of this:
    # a killed worker's messages go back to their queue about one lease after its last renewal.
    worker_lease_seconds: float = Field(15.0, ge=3, validation_alias=_env("BALANCES_WORKER_LEASE_SECONDS"))
    shared_read_ttl: int = Field(600, ge=1, validation_alias=_env("BALANCES_SHARED_READ_TTL"))

    forecast_horizon_days: int = Field(
        30, ge=1, le=366, validation_alias=_env("BALANCES_FORECAST_HORIZON_DAYS")
    )
    forecast_history_days: int = Field(
        90, ge=2, le=3660, validation_alias=_env("BALANCES_FORECAST_HISTORY_DAYS")
    )
    forecast_min_points: int = Field(7, ge=2, validation_alias=_env("BALANCES_FORECAST_MIN_POINTS"))

    # Retention (docs/retention.md): days kept of finished runs' items and tenants, of the machine's audit
    # rows (an operator's are kept), of runs' summaries and forecasts. Pruned daily, in batches of one
    # short transaction each, at most BALANCES_PRUNE_MAX_ROWS rows an invocation. Snapshots are kept.
    keep_run_items_days: int = Field(35, ge=2, validation_alias=_env("BALANCES_KEEP_RUN_ITEMS_DAYS"))
    keep_attempts_days: int = Field(35, ge=2, validation_alias=_env("BALANCES_KEEP_ATTEMPTS_DAYS"))
    keep_reports_days: int = Field(90, ge=2, validation_alias=_env("BALANCES_KEEP_REPORTS_DAYS"))
    prune_batch_size: int = Field(5000, ge=1, le=100_000, validation_alias=_env("BALANCES_PRUNE_BATCH_SIZE"))
    prune_max_rows: int = Field(1_000_000, ge=1, validation_alias=_env("BALANCES_PRUNE_MAX_ROWS"))

    # The push path (app.push): Powens' HMAC secret(s), comma-separated, newest first.
    webhook_secret: SecretStr | None = Field(None, validation_alias=_env("POWENS_WEBHOOK_SECRET"))
    webhook_tolerance_seconds: float = Field(
        300.0, gt=0, validation_alias=_env("BALANCES_WEBHOOK_TOLERANCE_SECONDS")
    )  # how far BI-Signature-Date may be from now (a replay window)
    webhook_max_body_bytes: int = Field(
        10 * 2**20, ge=1024, validation_alias=_env("BALANCES_WEBHOOK_MAX_BODY_BYTES")
    )
    # A nightly run does not read again an account whose balances a push stored this recently (0: always
    # read). A day: since about the previous nightly run.
    push_freshness_seconds: float = Field(
        86_400.0, ge=0, validation_alias=_env("BALANCES_PUSH_FRESHNESS_SECONDS")
    )
    # What an operator is shown: accounts whose Powens data is older than this, consents ending within
    # this, transient connection states lasting longer than this.
    stale_after_days: float = Field(3.0, gt=0, validation_alias=_env("BALANCES_STALE_AFTER_DAYS"))
    consent_warning_days: float = Field(7.0, gt=0, validation_alias=_env("BALANCES_CONSENT_WARNING_DAYS"))
    transient_state_days: float = Field(3.0, gt=0, validation_alias=_env("BALANCES_TRANSIENT_STATE_DAYS"))
    # The beat's gauges of the above (and of active connections) are counted by the database at most
    # this often, off the scrape; a scrape serves the last counts and when they were computed
    # (docs/design.md "Observability": the aggregates read every account, a scrape comes every 15 s).
    # At most 10 minutes: the ServiceGaugesStale alert takes counts 15 minutes old for stuck ones.
    gauge_refresh_seconds: float = Field(
        60.0, ge=1, le=600, validation_alias=_env("BALANCES_GAUGE_REFRESH_SECONDS")
    )

    # The run report (app.reports.notify): a signed POST of each finished nightly run's report. The URL
    # is a credential itself (a Slack or Teams webhook URL is all it takes to post): kept secret, and
    # logs name its host only. Unset: no report is sent.
    notify_url: SecretStr | None = Field(None, validation_alias=_env("BALANCES_NOTIFY_URL"))
    # The HMAC-SHA256 key of X-Balances-Signature; required with the URL.
    notify_secret: SecretStr | None = Field(None, validation_alias=_env("BALANCES_NOTIFY_SECRET"))
    # Retries of a delivery (connection errors, timeouts, 5xx, 429): full-jitter backoff from the base,
    # capped; Retry-After is a floor. The defaults try for up to about a quarter of an hour.
    notify_max_attempts: int = Field(8, ge=1, le=20, validation_alias=_env("BALANCES_NOTIFY_MAX_ATTEMPTS"))
    notify_retry_base_seconds: float = Field(
        10.0, gt=0, validation_alias=_env("BALANCES_NOTIFY_RETRY_BASE_SECONDS")
    )
    notify_retry_cap_seconds: float = Field(
        300.0, gt=0, validation_alias=_env("BALANCES_NOTIFY_RETRY_CAP_SECONDS")
    )
    # One POST, connecting and waiting for the answer's headers included.
    notify_timeout_seconds: float = Field(
        10.0, gt=0, le=60, validation_alias=_env("BALANCES_NOTIFY_TIMEOUT_SECONDS")
    )

    log_format: str = Field("json", pattern="^(json|text)$", validation_alias=_env("BALANCES_LOG_FORMAT"))
    # Where the admin shell writes its log records and telemetry events: this file when set; else
    # stderr when stderr is not a terminal (a job's log), else ~/.local/state/balances/shell.log, so an
    # operator's terminal shows the command's own lines only.
    shell_log: str | None = Field(None, validation_alias=_env("BALANCES_SHELL_LOG"))
    # Who the admin shell acts as when --as is not given (else the OS user): the demo's balances.env
    # names its admin, so the commands it prints work as printed.
    actor: str | None = Field(None, validation_alias=_env("BALANCES_ACTOR"))
    state_home: str | None = Field(None, validation_alias=_env("XDG_STATE_HOME"))
    log_level: str = Field("INFO", validation_alias=_env("BALANCES_LOG_LEVEL"))

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        return values.database_url(v)

    @field_validator("powens_domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return values.powens_domain(v)

    @field_validator("powens_base_url_override")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        return values.base_url(v)

    @field_validator("powens_timezone", "timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return values.zone(v)

    @field_validator("nightly_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return values.cron(v)

    @field_validator("encryption_key")
    @classmethod
    def _fernet_keys(cls, v: SecretStr | None) -> SecretStr | None:
        return values.fernet_keys(v)

    @field_validator("signing_key", "push_signing_key")
    @classmethod
    def _signing_keys(cls, v: SecretStr | None) -> SecretStr | None:
        return values.signing_keys(v)

    @field_validator("notify_url")
    @classmethod
    def _notify_url(cls, v: SecretStr | None) -> SecretStr | None:
        return values.notify_url(v)

    @field_validator("notify_secret")
    @classmethod
    def _notify_secret(cls, v: SecretStr | None) -> SecretStr | None:
        return values.notify_secret(v)

    @model_validator(mode="after")
    def _schedule(self) -> Settings:
        from app.schedule import cron_time_problem

        problem = cron_time_problem(self.nightly_cron, ZoneInfo(self.timezone))
        if problem:
            raise ValueError(f"BALANCES_NIGHTLY_CRON: {problem}")
        return self

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError("BALANCES_TASK_TIME_LIMIT must exceed BALANCES_TASK_SOFT_TIME_LIMIT")
        if self.plan_time_limit <= self.plan_soft_time_limit:
            raise ValueError("BALANCES_PLAN_TIME_LIMIT must exceed BALANCES_PLAN_SOFT_TIME_LIMIT")
        # A step may run for its hard limit, or wait for the queue to drain: its lease outlasts both.
        if self.plan_lease_seconds <= self.plan_time_limit + self.plan_wait_seconds:
            raise ValueError(
                "BALANCES_PLAN_LEASE_SECONDS must exceed "
                "BALANCES_PLAN_TIME_LIMIT + BALANCES_PLAN_WAIT_SECONDS"
            )
        # A countdown longer than the visibility timeout makes Redis redeliver the task early.
        if self.retry_cap_seconds + self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                "BALANCES_VISIBILITY_TIMEOUT must exceed "
                "BALANCES_RETRY_CAP_SECONDS + BALANCES_TASK_TIME_LIMIT"
            )
        if self.notify_retry_cap_seconds + self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                "BALANCES_VISIBILITY_TIMEOUT must exceed "
                "BALANCES_NOTIFY_RETRY_CAP_SECONDS + BALANCES_TASK_TIME_LIMIT"
            )
        return self

    @model_validator(mode="after")
    def _notify(self) -> Settings:
        # Checked at start: a report signed with no key could not be told from a forgery.
        if self.notify_url is not None and self.notify_secret is None:
            raise ValueError("BALANCES_NOTIFY_SECRET must be set when BALANCES_NOTIFY_URL is set")
        return self

    @property
    def powens_base_url(self) -> str:
        if self.powens_base_url_override:
            return self.powens_base_url_override
        if self.powens_domain:
            return f"https://{self.powens_domain}.biapi.pro/2.0/"
        raise ConfigError("POWENS_DOMAIN or POWENS_BASE_URL must be set to reach Powens")

    @property
    def powens_call_budget(self) -> float:
        """How long one Powens read may take, waiting for the rate limiter included: how long a task
        waits for another's shared read before giving up on this attempt."""
        return self.powens_total_timeout + self.rate_limit_max_wait + 5

    @property
    def webhook_secrets(self) -> list[bytes]:
        """POWENS_WEBHOOK_SECRET's secrets, newest first (any of them verifies a push)."""
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret is not None else ""
        return [k.strip().encode() for k in secret.split(",") if k.strip()]

    @property
    def notify_host(self) -> str | None:
        """All that logs and errors may say of BALANCES_NOTIFY_URL: its host (its path and query may
        be the credential, as in a Slack webhook URL)."""
        if self.notify_url is None:
            return None
        return urlsplit(self.notify_url.get_secret_value()).hostname

    @property
    def redis_url(self) -> str:
        return self.redis_url_override or self.celery_broker_url

    @property
    def powens_zone(self) -> ZoneInfo:
        return ZoneInfo(self.powens_timezone)

    @property
    def business_zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def business_day(self, at: datetime | None = None) -> date:
        """The business day an instant belongs to (snapshots, summaries): its date in BALANCES_TIMEZONE."""
        return (at or datetime.now(UTC)).astimezone(self.business_zone).date()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The embedded database's file (relative paths from the working directory); None for
        PostgreSQL and in-memory SQLite."""
        from sqlalchemy.engine import make_url

        if not self.is_sqlite:
            return None
        name = make_url(self.database_url).database
        return Path(name).resolve() if name and name != ":memory:" else None

    @property
    def shell_log_path(self) -> Path:
        """The admin shell's log file on a terminal: BALANCES_SHELL_LOG, else the user's state dir."""
        if self.shell_log:
            return Path(self.shell_log).expanduser()
        return Path(self.state_home or Path.home() / ".local" / "state") / "balances" / "shell.log"

    @property
    def metrics_directory(self) -> Path:
        if self.metrics_dir:
            return Path(self.metrics_dir)
        return Path(tempfile.gettempdir()) / f"balances-metrics-{self.metrics_port}"


_FIELD_TO_ENV = {
    name: (f.validation_alias.choices[0] if isinstance(f.validation_alias, AliasChoices) else name.upper())
    for name, f in Settings.model_fields.items()
}


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; errors name the variable, never echo a value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            # A check across several variables names them in its message.
            problems.append(f"{_FIELD_TO_ENV.get(loc[0], loc[0])}: {msg}" if loc else msg)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


_override: Settings | None = None


@lru_cache(maxsize=1)
def _cached() -> Settings:
    return load_settings()


def get_settings() -> Settings:
    return _override if _override is not None else _cached()


def use_settings(settings: Settings | None) -> None:
    """Install explicit settings for this process (the demo, tests); ``None`` goes back to the env."""
    global _override
    _override = settings
    _cached.cache_clear()
