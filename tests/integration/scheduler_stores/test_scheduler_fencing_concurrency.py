"""The lease fence under concurrency, on both backends: the branches of one run write their progress at
the same time, and a replica whose run was taken over cannot write again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import utcnow
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    LeaseLost,
    RunKey,
    RunState,
    TaskState,
    Transition,
)
from scheduler_svc.runs import Lease, RunStore

A = Lease("replica-a", 60)
B = Lease("replica-b", 60)
BRANCHES = [f"email{i}" for i in range(9)]
ACKS = 5


def publish_forked(campaigns: CampaignStore) -> RunKey:
    """A published campaign whose run is due at once: an audience, then nine email branches."""
    canvas = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            *(
                Activity(name, kind=ChannelSend("email", "marketing", "templates/offer", 3, ["tier"]))
                for name in BRANCHES
            ),
        ],
        transitions=[Transition("audience", name) for name in BRANCHES],
    )
    campaigns.create("prod", "forked", "", canvas)
    key = campaigns.publish("prod", "forked")[1]
    assert key is not None
    return key


def take_over(runs: RunStore, key: RunKey) -> ClaimedRun:
    """Replica B claims the run once A's lease has expired; a claim skips a run whose row a write in
    flight has locked (PostgreSQL), so it is tried again until it takes the run."""
    later = utcnow() + timedelta(seconds=61)
    for _ in range(10_000):  # a guard against a hang, not a speed requirement
        claimed = runs.claim_due_runs(B, limit=5, now=later)
        if claimed:
            assert [c.run.key for c in claimed] == [key]
            return claimed[0]
    raise AssertionError("replica B never took the run over")


def messages(runs: RunStore, key: RunKey) -> list[str]:
    """The messages of a run's log, oldest first."""
    return [entry.message for entry in runs.list_logs(key, 100)[0]]


WRITES: dict[str, Callable[[RunStore, RunKey, Lease], object]] = {
    "record_ack": lambda runs, key, lease: runs.record_ack(key, lease, "email0", Ack(sequence=3, sent=3)),
    "start_task": lambda runs, key, lease: runs.start_task(key, lease, "email1"),
    "finish_task": lambda runs, key, lease: runs.finish_task(key, lease, "email0"),
    "succeed_run": lambda runs, key, lease: runs.succeed_run(key, lease),
    "fail_run": lambda runs, key, lease: runs.fail_run(key, lease, "email0", "boom"),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_takeover_between_two_progress_writes_makes_the_old_holders_next_write_fail_with_lease_lost(
    campaigns: CampaignStore, runs: RunStore, write: str
) -> None:
    key = publish_forked(campaigns)
    runs.claim_due_runs(A, limit=5)
    runs.start_task(key, A, "email0", targeted=9)

    take_over(runs, key)

    before = runs.get(key)
    logged = messages(runs, key)
    with pytest.raises(LeaseLost):
        WRITES[write](runs, key, A)
    after = runs.get(key)
    assert (after.state, after.lease_owner, after.tasks, messages(runs, key)) == (
        RunState.RUNNING,
        "replica-b",
        before.tasks,
        logged,
    )
    assert logged[-2:] == ["activity started", "claimed by replica replica-b"]


def test_the_new_holder_writes_progress_after_a_takeover(campaigns: CampaignStore, runs: RunStore) -> None:
    key = publish_forked(campaigns)
    runs.claim_due_runs(A, limit=5)
    runs.record_ack(key, A, "email0", Ack(sequence=3, sent=3))

    take_over(runs, key)

    assert runs.record_ack(key, B, "email0", Ack(sequence=6, sent=2)) is True
    task = runs.get(key).tasks[1]
    assert (task.activity, task.sent, task.checkpoint) == ("email0", 5, 6)


def test_concurrent_progress_writes_of_one_run_from_its_holder_all_commit(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    runs.claim_due_runs(A, limit=5)

    def branch(activity: str) -> None:
        runs.start_task(key, A, activity, targeted=ACKS)
        for sequence in range(1, ACKS + 1):
            assert runs.record_ack(key, A, activity, Ack(sequence=sequence, sent=1)) is True
        runs.finish_task(key, A, activity)

    with ThreadPoolExecutor(max_workers=len(BRANCHES)) as pool:
        list(pool.map(branch, BRANCHES))

    run = runs.get(key)
    assert (run.state, run.lease_owner) == (RunState.RUNNING, "replica-a")
    assert [(t.activity, t.state, t.sent, t.checkpoint) for t in run.tasks[1:]] == [
        (name, TaskState.SUCCEEDED, ACKS, ACKS) for name in BRANCHES
    ]
    logged = sorted((e.activity, e.message) for e in runs.list_logs(key, 100)[0] if e.activity)
    assert logged == sorted(
        [(name, "activity started") for name in BRANCHES]
        + [(name, f"activity succeeded: targeted {ACKS}, sent {ACKS}, already sent 0") for name in BRANCHES]
    )


def test_no_progress_write_of_the_old_holder_commits_after_a_concurrent_takeover(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    runs.claim_due_runs(A, limit=5)
    taken = threading.Event()
    writing = threading.Barrier(len(BRANCHES) + 1)

    def branch(activity: str) -> tuple[int, list[int]]:
        """Acks until the lease is lost (or 300 were sent): how many committed, and the sequences of those
        that committed although they started after the takeover."""
        committed, late = 0, list[int]()
        for sequence in range(1, 301):
            if sequence == 4:
                writing.wait()  # every branch has written three acks: the takeover races with the next ones
            after_takeover = taken.is_set()
            try:
                runs.record_ack(key, A, activity, Ack(sequence=sequence, sent=1))
            except LeaseLost:
                return committed, late
            committed += 1
            if after_takeover:
                late.append(sequence)
        return committed, late

    with ThreadPoolExecutor(max_workers=len(BRANCHES)) as pool:
        results = [pool.submit(branch, name) for name in BRANCHES]
        writing.wait()
        claimed = take_over(runs, key)
        taken.set()
        outcomes = [r.result() for r in results]

    assert [late for _, late in outcomes] == [[] for _ in BRANCHES]
    run = runs.get(key)
    assert run.lease_owner == "replica-b"
    # Every committed ack is counted, and all of them committed before the takeover: B resumes from
    # exactly what it read when it claimed the run.
    assert [(t.sent, t.checkpoint) for t in run.tasks[1:]] == [(n, n) for n, _ in outcomes]
    assert [(t.sent, t.checkpoint) for t in claimed.run.tasks[1:]] == [(n, n) for n, _ in outcomes]


def test_a_progress_write_in_the_first_third_of_the_lease_does_not_renew_it(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    key = publish_forked(campaigns)
    runs.claim_due_runs(A, limit=5)
    claimed_until = runs.get(key).lease_expires

    runs.start_task(key, A, "email0")

    assert runs.get(key).lease_expires == claimed_until


def test_a_progress_write_renews_the_lease_once_a_third_of_it_has_passed(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    instant = Lease("replica-a", 0)  # a third of no time has always passed: every write renews
    key = publish_forked(campaigns)
    runs.claim_due_runs(instant, limit=5)
    claimed_until = runs.get(key).lease_expires
    assert claimed_until is not None

    runs.start_task(key, instant, "email0")

    renewed_until = runs.get(key).lease_expires
    assert renewed_until is not None and renewed_until > claimed_until
