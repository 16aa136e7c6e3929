"""Tables (SQLAlchemy 2 typed ORM). Works on PostgreSQL (production, tests) and SQLite (embedded).

Money is NUMERIC without precision or scale on PostgreSQL: every amount Powens sends is kept digit
for digit (a fixed scale would round silently). SQLite has no decimal type (it would store REAL and
add binary noise), so there the ``Money`` type keeps the exact decimal text.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from app.store.states import (
    AccountStatus,
    AttemptOutcome,
    ItemStatus,
    ReportOutcome,
    RunKind,
    RunStatus,
    TenantStatus,
    Trigger,
    check_in,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Money(TypeDecorator[Decimal]):
    impl = Numeric()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(64))
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"money must be Decimal, got {type(value).__name__}")
        return format(value, "f") if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return _normalize(Decimal(value) if not isinstance(value, Decimal) else value)


def _normalize(d: Decimal) -> Decimal:
    """Give back the amount with its significant places only (a database may pad the scale): trailing
    zeros of the fraction dropped, every other digit kept. Decimal's own ``normalize`` rounds to its
    context's 28 digits; this never rounds (as many digits as the amount has)."""
    sign, digits, exponent = d.as_tuple()
    if not isinstance(exponent, int) or exponent >= 0:
        return d
    keep = len(digits)
    while keep > 1 and digits[keep - 1] == 0 and exponent < 0:
        keep -= 1
        exponent += 1
    return Decimal((sign, digits[:keep], exponent))


class UTCDateTime(TypeDecorator[datetime]):
    """Always timezone-aware UTC in Python; SQLite forgets the zone, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Actor(Base):
    __tablename__ = "actors"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PowensUser(Base):
    """A Powens user a tenant linked, with its permanent token (Fernet). Unlinked (``balances powens
    unlink``): the token is gone and ``unlinked_at`` says since when; the row stays, so its accounts'
    history does (they are ``unlinked``), and linking the same user again takes the row back."""

    __tablename__ = "powens_users"
    __table_args__ = (
        CheckConstraint("(token_encrypted IS NULL) = (unlinked_at IS NOT NULL)", name="linked"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    powens_user_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None: unlinked
    unlinked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BankConnection(Base):
    __tablename__ = "bank_connections"
    __table_args__ = (UniqueConstraint("powens_user_pk", "external_id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    powens_user_pk: Mapped[int] = mapped_column(ForeignKey("powens_users.id", ondelete="CASCADE"))
    external_id: Mapped[int] = mapped_column(BigInteger)
    id_connector: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    state: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_update: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_try: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Since when the connection is in its current state (a transient state that lasts is escalated).
    state_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When its PSD2 consent ends (Powens ``expire`` / ``sources[].access_expire``, the earliest).
    consent_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def set_state(self, state: str | None, now: datetime) -> bool:
        """The one way a connection's state changes: ``state_since`` follows. True when it changed."""
        if state == self.state:
            return False
        self.state = state
        self.state_since = now if state is not None else None
        self.updated_at = now
        return True


class ForcedSync(Base):
    """One forced background sync of a connection (PSD2: at most 4 per 24 h without the user)."""

    __tablename__ = "forced_syncs"
    __table_args__ = (
        Index("ix_forced_syncs_connection_at", "connection_id", "at"),
        Index("ix_forced_syncs_task_id", "task_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    connection_id: Mapped[str] = mapped_column(ForeignKey("bank_connections.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    # The refresh task that forced it: its retries never force again (a slot per request, not per try).
    task_id: Mapped[str | None] = mapped_column(String(200), nullable=True)


class BankAccount(Base):
    __tablename__ = "bank_accounts"
    __table_args__ = (
        UniqueConstraint("powens_user_pk", "external_id"),
        Index("ix_bank_accounts_tenant_status", "tenant_id", "status"),
        # The planner's keyset: active accounts in (tenant, Powens user, id) order, a page at a time.
        Index(
            "ix_bank_accounts_active_plan",
            "tenant_id",
            "powens_user_pk",
            "id",
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
        CheckConstraint(check_in("status", AccountStatus), name="status"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    powens_user_pk: Mapped[int] = mapped_column(ForeignKey("powens_users.id", ondelete="CASCADE"))
    connection_id: Mapped[str] = mapped_column(ForeignKey("bank_connections.id", ondelete="CASCADE"))
    external_id: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(300))
    original_name: Mapped[str | None] = mapped_column(String(300), nullable=True)
    account_type: Mapped[str] = mapped_column(String(64))
    usage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    currency: Mapped[str | None] = mapped_column(String(3), nullable=True)  # null: Powens has none yet
    # Masked as ContractSpec masks them (all but the last 4 characters): the full values never stored.
    iban_masked: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bic: Mapped[str | None] = mapped_column(String(16), nullable=True)
    number_masked: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=AccountStatus.ACTIVE)
    # When Powens' word set the status (a read's answer, a push's arrival): an older word changes nothing.
    status_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    balance: Mapped[Decimal | None] = mapped_column(Money(), nullable=True)
    coming: Mapped[Decimal | None] = mapped_column(Money(), nullable=True)
    powens_last_update: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When a Powens push last stored this account's balances (the nightly run may then skip it).
    pushed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_synced_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AccountBalance(Base):
    """The latest canonical record per (account, balance type)."""

    __tablename__ = "account_balances"
    __table_args__ = (UniqueConstraint("account_id", "balance_type"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("bank_accounts.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    connection_id: Mapped[str] = mapped_column(String(64))
    balance_type: Mapped[str] = mapped_column(String(64))
    current_balance: Mapped[Decimal] = mapped_column(Money())
    available_balance: Mapped[Decimal | None] = mapped_column(Money(), nullable=True)
    currency: Mapped[str] = mapped_column(String(3))
    last_updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    refreshed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)


class BalanceSnapshot(Base):
    """Daily history: one row per (account, balance type, business day), kept forever (the forecasts'
    history). On PostgreSQL partitioned by month on ``day`` (migration 0012, ``app.store.partitions``),
    where the primary key is ``(id, day)``: a partitioned table's keys include its partition key. ``id``
    (from one sequence) is the ORM's identity either way."""

    __tablename__ = "balance_snapshots"
    __table_args__ = (
        UniqueConstraint("account_id", "balance_type", "day"),
        Index("ix_balance_snapshots_tenant_day", "tenant_id", "day"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("bank_accounts.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    balance_type: Mapped[str] = mapped_column(String(64))
    day: Mapped[date] = mapped_column(Date)
    current_balance: Mapped[Decimal] = mapped_column(Money())
    available_balance: Mapped[Decimal | None] = mapped_column(Money(), nullable=True)
    currency: Mapped[str] = mapped_column(String(3))
    last_updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    refreshed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Copied from the latest record by the day's run, which did not read the account (a push kept it).
    carried: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RefreshAttempt(Base):
    """Audit: one row per terminal outcome of a refresh (success, failure, denial)."""

    __tablename__ = "refresh_attempts"
    __table_args__ = (
        Index("ix_refresh_attempts_tenant_account", "tenant_id", "account_id"),
        Index("ix_refresh_attempts_run", "run_id"),
        # Retention deletes the oldest by keyset on it (app.store.retention, migration 0012).
        Index("ix_refresh_attempts_finished", "finished_at", "id"),
        CheckConstraint(check_in("outcome", AttemptOutcome), name="outcome"),
        CheckConstraint(check_in("trigger", Trigger), name="trigger"),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    operation: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    account_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    trigger: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    balance_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    force_refresh: Mapped[bool] = mapped_column(Boolean, default=False)
    powens_request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    errors: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # A rate-limited failure: when trying again is allowed (Powens' Retry-After, else our backoff).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RefreshRun(Base):
    """A nightly run: a small state machine (``app.store.states.RUN_MOVES``)."""

    __tablename__ = "refresh_runs"
    __table_args__ = (
        UniqueConstraint("tick"),
        CheckConstraint(check_in("status", RunStatus), name="status"),
        CheckConstraint(check_in("trigger", Trigger), name="trigger"),
        CheckConstraint(check_in("kind", RunKind), name="kind"),
        CheckConstraint(check_in("report_outcome", ReportOutcome), name="report_outcome"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default=RunKind.NIGHTLY)
    trigger: Mapped[str] = mapped_column(String(16))
    # Scheduled runs carry their beat tick, so two beats (or a re-sent tick) make one run.
    tick: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.PENDING)
    actor: Mapped[str] = mapped_column(String(128))
    total_tenants: Mapped[int] = mapped_column(Integer, default=0)
    total_accounts: Mapped[int] = mapped_column(Integer, default=0)
    # Fixed when the run starts (a scheduled run: its slot's day); summaries and forecasts use it.
    business_day: Mapped[date | None] = mapped_column(Date, nullable=True)
    # How often the sweeper re-drove a stalled run (re-published its pending items) or re-planned it.
    redrives: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    replans: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    planned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    redispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The run's report (app.reports.notify, app.store.run_reports): its holder and lease, attempts,
    # how it ended and when, the sweeper's re-sends.
    report_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    report_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    report_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    report_outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    report_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    report_resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Planning in steps (app.store.planning): its cursor, what it published, its planner's lease.
    plan_tenant_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    plan_user_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    plan_account_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    published_tenant_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    published_user_pk: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    published_account_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    planner_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Its items' final counts, written by the move that ends it (its items are pruned later).
    outcomes: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RunTenant(Base):
    """Per tenant of a run (``TENANT_MOVES``). ``remaining`` counts the accounts without a terminal
    outcome; the move out of refreshing is claimed by one conditional UPDATE."""

    __tablename__ = "run_tenants"
    __table_args__ = (
        CheckConstraint(check_in("status", TenantStatus), name="status"),
        # Whether a run still has a tenant open, and which are ready: read by index, not counted.
        Index("ix_run_tenants_run_status", "run_id", "status"),
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("refresh_runs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=TenantStatus.REFRESHING)
    expected: Mapped[int] = mapped_column(Integer, default=0)
    remaining: Mapped[int] = mapped_column(Integer, default=0)
    stale: Mapped[int] = mapped_column(Integer, default=0)
    summary_enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # How often the sweeper re-sent this tenant's summary or forecast task (bounded).
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RunItem(Base):
    """One account of a run and its terminal outcome (``ITEM_MOVES``)."""

    __tablename__ = "run_items"
    __table_args__ = (
        Index("ix_run_items_run_status", "run_id", "status"),
        Index("ix_run_items_run_finished", "run_id", "finished_at"),
        Index("ix_run_items_run_user", "run_id", "powens_user_pk", "account_id"),
        Index("ix_run_items_run_plan", "run_id", "tenant_id", "powens_user_pk", "account_id"),  # + keyset
        CheckConstraint(check_in("status", ItemStatus), name="status"),
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("refresh_runs.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    # Items are published grouped by Powens user, so a user's accounts meet at its shared read together.
    powens_user_pk: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    task_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditEvent(Base):
    """Who did what to whom, and when, for what is not a refresh (those are ``refresh_attempts``):
    role grants and revokes, the bootstrap, key rotations, reconnect links issued, Powens users linked
    and unlinked, forged messages."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    operation: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str | None] = mapped_column(String(256), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))  # done | denied | refused
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class TenantSummary(Base):
    __tablename__ = "tenant_summaries"
    __table_args__ = (UniqueConstraint("run_id", "tenant_id"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class CashflowForecast(Base):
    __tablename__ = "cashflow_forecasts"
    __table_args__ = (UniqueConstraint("run_id", "tenant_id", "currency"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    method: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
