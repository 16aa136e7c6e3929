"""A commit in doubt: the database stored the outcomes, but the connection was lost before COMMIT's
answer came back (a PostgreSQL cut at that moment). The delivery re-queues; the redelivery finds the
outcomes recorded and must announce them (counter and telemetry) exactly once: before, they were
stored and never counted (found by the fault suite's PostgreSQL cut with 50-account batches: 150
audit rows, 100 counted). Every path that records holds to it: the nightly batch and the single
refresh. The fault is injected after a real COMMIT on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import pytest
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.nightly import pipeline
from app.nightly.batch import run_batch
from app.refresh import write
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Attempt, Succeeded
from app.store import runs
from app.store.states import Trigger
from tests.support.data import ADMIN_ACTOR, seed_tenant
from tests.support.metrics import refreshed_total


@pytest.fixture
def lost_commit_answer(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The next recording transaction commits, then its caller sees the connection lost."""
    armed: list[int] = []
    real = write.apply

    def apply(session: Session, *args: object, **kwargs: object) -> object:
        session.info["records"] = True
        return real(session, *args, **kwargs)  # type: ignore[arg-type]

    def after_commit(session: Session) -> None:
        if session.info.pop("records", False) and armed:
            armed.pop()
            raise sa_exc.OperationalError(
                "COMMIT", {}, Exception("server closed the connection unexpectedly")
            )

    monkeypatch.setattr(write, "apply", apply)
    event.listen(Session, "after_commit", after_commit)
    yield armed
    event.remove(Session, "after_commit", after_commit)


def test_a_batch_whose_commit_was_in_doubt_is_announced_once_by_its_redelivery(
    settings: Settings, sandbox: Sandbox, lost_commit_answer: list[int]
) -> None:
    seed_tenant(settings, sandbox, "doubt-batch", accounts=3)
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    items: list[runs.Item] = []
    pipeline.plan_run(settings, run_id, lambda _r, page: items.extend(page), lambda *_: None)
    before = refreshed_total("scheduled")

    lost_commit_answer.append(1)
    with pytest.raises(sa_exc.OperationalError):  # the task re-queues on it
        run_batch(Deps.default(settings), run_id, items, date(2026, 11, 24))
    assert refreshed_total("scheduled") == before  # stored (below), not yet announced

    again = run_batch(Deps.default(settings), run_id, items, date(2026, 11, 24))
    assert again.skipped == 3 and again.succeeded == 0  # nothing written twice
    assert refreshed_total("scheduled") - before == 3  # what the lost commit stored, announced now

    third = run_batch(Deps.default(settings), run_id, items, date(2026, 11, 24))
    assert third.skipped == 3 and refreshed_total("scheduled") - before == 3  # once


def test_a_single_refresh_whose_commit_was_in_doubt_is_announced_once_by_its_redelivery(
    settings: Settings, sandbox: Sandbox, lost_commit_answer: list[int]
) -> None:
    t = seed_tenant(settings, sandbox, "doubt-single", accounts=1)
    raw = {"tenantId": t.tenant_id, "accountId": t.account_ids[0]}
    attempt = Attempt(number=1, max_attempts=3, task_id="doubt-single-task")
    deps = Deps.default(settings)
    before = refreshed_total("on_demand")

    lost_commit_answer.append(1)
    first = execute(raw, ADMIN_ACTOR, Trigger.ON_DEMAND, attempt=attempt, deps=deps)
    assert not isinstance(first, Succeeded)  # re-queued: the outcome is not known here
    assert refreshed_total("on_demand") == before

    again = execute(raw, ADMIN_ACTOR, Trigger.ON_DEMAND, attempt=attempt, deps=deps)
    assert isinstance(again, Succeeded) and again.replayed
    assert refreshed_total("on_demand") - before == 1
    execute(raw, ADMIN_ACTOR, Trigger.ON_DEMAND, attempt=attempt, deps=deps)
    assert refreshed_total("on_demand") - before == 1
