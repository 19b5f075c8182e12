"""Fencing tokens, on both backends: every claim of a run carries a new token, and the writes, renewals and
releases of an earlier claim fail, even when the same replica claimed the run again (its lease expired while
the old execution was still going, say after a stalled event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database, utcnow
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import Ack, ClaimedRun, LeaseLost, RunKey, RunState, TaskState
from scheduler_svc.runner import Runner, StoreJournal, executing_claim
from scheduler_svc.runs import Lease, RunStore
from scheduler_svc.tables import MIGRATIONS, RUNS
from tests.integration.scheduler_stores.test_scheduler_fencing_concurrency import WRITES, messages, publish_forked
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery

A = Lease("replica-a", 60)
B = Lease("replica-b", 60)


def claim_again(runs: RunStore, lease: Lease, key: RunKey, after_s: float = 61) -> ClaimedRun:
    """``lease``'s owner claims the run again once the earlier claim's lease has expired."""
    (claimed,) = runs.claim_due_runs(lease, limit=5, now=utcnow() + timedelta(seconds=after_s))
    assert claimed.run.key == key
    return claimed


def stored_token(database: Database, key: RunKey) -> int:
    """The fencing token stored in the run's row."""
    with database.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(RUNS.c.fencing_token).where(
                    RUNS.c.sandbox == key.sandbox, RUNS.c.campaign_id == key.campaign_id, RUNS.c.run_id == key.run_id
                )
            ).scalar_one()
        )


def test_every_claim_of_a_run_carries_a_fencing_token_one_greater_than_the_claim_before(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)

    (first,) = runs.claim_due_runs(A, limit=5)
    second = claim_again(runs, A, key)
    third = claim_again(runs, B, key, after_s=200)

    assert [first.fencing_token, second.fencing_token, third.fencing_token] == [1, 2, 3]
    assert stored_token(database, key) == 3
    assert [m for m in messages(runs, key) if m.startswith("claimed")] == [
        "claimed by replica replica-a",
        "claimed by replica replica-a",
        "claimed by replica replica-b",
    ]


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_with_the_token_of_the_same_replicas_earlier_claim_fails_with_lease_lost_and_writes_nothing(
    campaigns: CampaignStore, runs: RunStore, write: str
) -> None:
    key = publish_forked(campaigns)
    (first,) = runs.claim_due_runs(A, limit=5)
    old = A.of_claim(first)
    runs.start_task(key, old, "email0", targeted=9)

    claim_again(runs, A, key)

    before = runs.get(key)
    logged = messages(runs, key)
    with pytest.raises(LeaseLost, match="replica-a \\(fencing token 1\\)"):
        WRITES[write](runs, key, old)
    after = runs.get(key)
    assert (after.state, after.lease_owner, after.lease_expires, after.tasks, messages(runs, key)) == (
        RunState.RUNNING,
        "replica-a",
        before.lease_expires,
        before.tasks,
        logged,
    )


def test_a_write_with_a_stale_token_fails_even_when_it_would_renew_the_lease(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    instant = Lease("replica-a", 0)  # a third of no time has always passed: every write renews
    key = publish_forked(campaigns)
    (first,) = runs.claim_due_runs(instant, limit=5)
    claim_again(runs, instant, key, after_s=1)
    before = runs.get(key)

    with pytest.raises(LeaseLost):
        runs.start_task(key, instant.of_claim(first), "email0")

    after = runs.get(key)
    assert (after.lease_expires, after.tasks) == (before.lease_expires, before.tasks)


def test_the_same_replicas_new_claim_writes_progress_once_its_earlier_claim_is_fenced_off(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    (first,) = runs.claim_due_runs(A, limit=5)
    old = A.of_claim(first)
    runs.record_ack(key, old, "email0", Ack(sequence=3, sent=3))
    new = A.of_claim(claim_again(runs, A, key))
    with pytest.raises(LeaseLost):
        runs.record_ack(key, old, "email0", Ack(sequence=6, sent=3))

    assert runs.record_ack(key, new, "email0", Ack(sequence=6, sent=2)) is True
    runs.finish_task(key, new, "email0")

    task = runs.get(key).tasks[1]
    assert (task.activity, task.state, task.sent, task.checkpoint) == ("email0", TaskState.SUCCEEDED, 5, 6)


def test_renewing_the_lease_of_an_earlier_claim_fails_and_leaves_the_new_lease_as_it_is(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    (first,) = runs.claim_due_runs(A, limit=5)
    second = claim_again(runs, A, key)
    claimed_until = runs.get(key).lease_expires

    assert runs.renew_lease(key, A.of_claim(first), now=utcnow() + timedelta(seconds=100)) is False
    assert runs.get(key).lease_expires == claimed_until
    assert runs.renew_lease(key, A.of_claim(second), now=utcnow() + timedelta(seconds=100)) is True


def test_releasing_the_lease_of_an_earlier_claim_leaves_the_run_to_the_new_claim(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    (first,) = runs.claim_due_runs(A, limit=5)
    second = claim_again(runs, A, key)

    runs.release_lease(key, A.of_claim(first))

    assert runs.claim_due_runs(B, limit=5, now=utcnow() + timedelta(seconds=70)) == []
    runs.release_lease(key, A.of_claim(second))
    assert [c.run.key for c in runs.claim_due_runs(B, limit=5, now=utcnow() + timedelta(seconds=70))] == [key]


async def test_a_journal_write_of_an_execution_whose_run_was_claimed_again_fails_with_lease_lost(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    journal = StoreJournal(database, runs, A)
    (first,) = runs.claim_due_runs(A, limit=5)
    second = claim_again(runs, A, key)

    with executing_claim(key, A.of_claim(first)), pytest.raises(LeaseLost):
        await journal.start_task(key, "email0", targeted=9)
    with executing_claim(key, A.of_claim(second)):
        await journal.start_task(key, "email1", targeted=9)

    assert [(t.activity, t.state) for t in runs.get(key).tasks[1:3]] == [
        ("email0", TaskState.PENDING),
        ("email1", TaskState.RUNNING),
    ]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):  # a guard against a hang, not a speed requirement
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_runner_that_claims_again_a_run_it_still_executes_cancels_the_older_execution(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    delivery = FakeDelivery(stall_after=1)
    engine = Engine(FakeAudience(size=9), {"email": delivery}, StoreJournal(database, runs, A), EngineOptions())
    runner = Runner(database=database, runs=runs, engine=engine, lease=A, poll_interval_s=60, max_concurrent_runs=5)
    try:
        assert await runner.poll_once() == [key]
        await until(lambda: runs.get(key).tasks[1].checkpoint > 0)
        (older,) = [t for t in asyncio.all_tasks() if t.get_name() == f"run {key.name}"]
        # The lease expires while the execution is still going (as after a stalled event loop).
        with database.engine.begin() as conn:
            conn.execute(
                RUNS.update().where(RUNS.c.run_id == key.run_id).values(lease_expires=utcnow() - timedelta(seconds=1))
            )

        claimed: list[RunKey] = []
        async with asyncio.timeout(30):  # a claim skips the row while a write in flight locks it (PostgreSQL)
            while not claimed:
                claimed = await runner.poll_once()
        assert claimed == [key]
        await until(older.done)

        # The older execution stops: cancelled, or ended by the LeaseLost of a write it had in flight
        # when the cancellation came (a task group then reports the error, not the cancellation).
        assert older.cancelled() or older.exception() is None
        assert runner.executing == [key]
        assert stored_token(database, key) == 2
    finally:
        await runner.stop()
    # Stopping released the lease of the newer claim: another replica takes the run at once.
    assert [c.run.key for c in runs.claim_due_runs(B, limit=5)] == [key]


def test_the_fencing_token_migration_gives_the_runs_of_an_older_database_a_token_their_next_claim_increments(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    with database.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE runs DROP COLUMN fencing_token"))  # as created before migration 7
    (migration,) = [m for m in MIGRATIONS if m.version == 7]

    with database.engine.begin() as conn:
        migration.apply(conn)

    assert stored_token(database, key) == 0
    (claimed,) = runs.claim_due_runs(A, limit=5)
    assert (claimed.run.key, claimed.fencing_token, stored_token(database, key)) == (key, 1, 1)
