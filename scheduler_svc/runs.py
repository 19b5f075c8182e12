"""Runs: claiming due runs with leases, recording their progress, and reading them back.

A run is *due* when it is PENDING with ``scheduled_time <= now``, or RUNNING with an expired lease
(the replica executing it crashed or lost its database). Claiming sets ``lease_owner`` and
``lease_expires``, increments the run's ``fencing_token`` (returned as
:attr:`ClaimedRun.fencing_token`) and moves the run to RUNNING and its campaign to LIVE:

- on PostgreSQL, due runs are selected ``FOR UPDATE SKIP LOCKED``, so replicas claiming at the same
  time never block on, nor take, the same run;
- on SQLite (the single-replica, embedded default) each candidate is taken with a conditional
  ``UPDATE ... WHERE <still due>``; SQLite serializes writers, so a run is still claimed at most once.

Every progress write checks the lease (the fence: the run is RUNNING, leased to the writer and still
at the fencing token of the writer's claim, :meth:`Lease.of_claim`) in the same transaction, so an
execution that lost its run (it was claimed again after the lease expired, by another replica or by
the same one while the old execution was still going, or it was cancelled) cannot write to it any
more: it gets :class:`LeaseLost` and writes nothing. Renewals and releases check the token the same
way. A lease without a token (the replica's own, which claims runs) stands for every claim of its
owner; the runner writes with each claim's lease. The run log keeps saying "claimed by replica X".
The check must not serialize the concurrent branches of one run on the run's row:

- on PostgreSQL it reads the row ``FOR SHARE``: progress writes of one run share the lock, while a
  takeover's (or a cancellation's) ``UPDATE`` waits for the writes in flight to commit, and a write
  that starts after the takeover sees the new owner or token and raises :class:`LeaseLost`;
- the lease is renewed (an ``UPDATE`` of the row, taken before anything else in the transaction so
  a shared lock is never upgraded) only when a third of the lease has passed since this store last
  took or renewed it, or by the runner's heartbeat; writes that change the run's row itself (ending
  or suspending it) take the exclusive lock first in the same way;
- on SQLite (one writer at a time) the check is always that ``UPDATE`` (leaving the expiry as it is
  when no renewal is due): it takes the database's write lock before the transaction reads anything,
  so no takeover can commit in between.

Counts and the checkpoint of a channel task change in one transaction per acknowledged batch; an
acknowledgement at or before the stored checkpoint is already counted and is ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from carillon_chassis.pagination import decode_token, encode_token, page_size
from scheduler_svc.campaigns import complete_if_done
from scheduler_svc.model import (
    Ack,
    CampaignState,
    Canvas,
    ClaimedRun,
    DeferredBatch,
    LeaseLost,
    LogEntry,
    LogLevel,
    Run,
    RunKey,
    RunState,
    RunTrigger,
    Task,
    TaskState,
    canvas_from_json,
    parameters_from_json,
    transition_counts,
)
from scheduler_svc.runlog import entries_after, list_logs, log_event
from scheduler_svc.tables import CAMPAIGNS, RUN_TASKS, RUNS

AWAITING, CONFIRMED = "awaiting", "confirmed"
_FINISHED_TASKS = (TaskState.SUCCEEDED.value, TaskState.FAILED.value, TaskState.SKIPPED.value)


@dataclass(frozen=True)
class Lease:
    """Who holds a lease, for how long each claim or renewal extends it, and the fencing token of the
    claim it belongs to.

    ``token`` is the run's ``fencing_token`` returned with the claim (:attr:`ClaimedRun.fencing_token`);
    writes with it fail once the run is claimed again, even by the same owner. A lease without a token
    (the replica's own, before any claim) stands for every claim of its owner: it claims runs, and
    tools and tests write with it.
    """

    owner: str
    duration_s: float
    token: int | None = None

    def expiry(self, now: datetime) -> datetime:
        """When a lease taken or renewed at ``now`` expires."""
        return now + timedelta(seconds=self.duration_s)

    def of_claim(self, claimed: ClaimedRun) -> Lease:
        """This lease narrowed to one claim: its writes fail once the run is claimed again."""
        return Lease(self.owner, self.duration_s, claimed.fencing_token)

    def __str__(self) -> str:
        return self.owner if self.token is None else f"{self.owner} (fencing token {self.token})"


def _held(lease: Lease) -> tuple[sa.ColumnElement[bool], ...]:
    """The run is RUNNING and leased to ``lease`` (to its claim, when it has a token)."""
    held = (RUNS.c.state == RunState.RUNNING.value, RUNS.c.lease_owner == lease.owner)
    return held if lease.token is None else (*held, RUNS.c.fencing_token == lease.token)


def _merge(stored: Mapping[str, int] | None, added: Mapping[str, int] | None) -> dict[str, int]:
    merged = dict(stored or {})
    for reason, count in (added or {}).items():
        if count:
            merged[reason] = merged.get(reason, 0) + int(count)
    return merged


def replay_counts(
    total: Mapping[str, int] | None, before: Mapping[str, int], after: Mapping[str, int]
) -> dict[str, int]:
    """A task's counts by reason once a replayed batch's counts ``after`` replace its earlier ``before``."""
    merged = dict(total or {})
    for reason in set(before) | set(after):
        count = merged.get(reason, 0) - before.get(reason, 0) + after.get(reason, 0)
        if count > 0:
            merged[reason] = count
        else:
            merged.pop(reason, None)
    return merged


def _key_where(table: sa.Table, key: RunKey) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        table.c.sandbox == key.sandbox,
        table.c.campaign_id == key.campaign_id,
        table.c.run_id == key.run_id,
    )


def _update_task(conn: sa.Connection, key: RunKey, activity: str, **values: object) -> None:
    """Set columns of one task of a run (the caller holds the run's lease in the same transaction)."""
    conn.execute(
        RUN_TASKS.update().where(*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity).values(**values)
    )


def _counts(task: Task) -> str:
    parts = [f"targeted {task.targeted}"]
    if task.sent or task.already_sent or task.skipped or task.failed:
        parts += [f"sent {task.sent}", f"already sent {task.already_sent}"]
        parts += [f"skipped {reason} {n}" for reason, n in sorted(task.skipped.items())]
        parts += [f"failed {reason} {n}" for reason, n in sorted(task.failed.items())]
    return ", ".join(parts)


def task_from_row(row: Any) -> Task:
    """The domain task of a ``run_tasks`` row mapping."""
    return Task(
        activity=row["activity"],
        state=TaskState(row["state"]),
        targeted=row["targeted"],
        sent=row["sent"],
        already_sent=row["already_sent"],
        skipped=dict(row["skipped"] or {}),
        failed=dict(row["failed"] or {}),
        working_set=row["working_set"],
        checkpoint=row["checkpoint"],
        message=row["message"],
        start_time=as_utc(row["start_time"]),
        end_time=as_utc(row["end_time"]),
        outputs=dict(row["outputs"] or {}),
        wake_time=as_utc(row["wake_time"]),
        output_working_sets=dict(row["output_working_sets"] or {}),
        deferred=row["deferred"] or 0,
        deferred_batches=[DeferredBatch.from_json(b) for b in row["deferred_batches"] or []],
        confirmation=row["confirmation"] or "",
    )


def run_from_row(row: Any, tasks: list[Task]) -> Run:
    """The domain run of a ``runs`` row mapping and its tasks."""
    return Run(
        key=RunKey(row["sandbox"], row["campaign_id"], row["run_id"]),
        state=RunState(row["state"]),
        scheduled_time=as_utc(row["scheduled_time"]) or utcnow(),
        create_time=as_utc(row["create_time"]) or utcnow(),
        tasks=tasks,
        start_time=as_utc(row["start_time"]),
        end_time=as_utc(row["end_time"]),
        error=row["error"],
        lease_owner=row["lease_owner"],
        lease_expires=as_utc(row["lease_expires"]),
        trigger=RunTrigger(row["triggered_by"]),
        parameters=parameters_from_json(row["parameters"]),
    )


class RunStore:
    """The runs of one database: claims, leases, progress and reads."""

    def __init__(self, database: Database) -> None:
        self.database = database
        # When this store last took or renewed each lease it holds (monotonic clock), by run and owner,
        # with the fencing token of the claim (a token-less lease shares the entry of its owner's claim).
        self._renewed: dict[tuple[RunKey, str], tuple[int | None, float]] = {}
        self._renewed_lock = threading.Lock()

    def _note_renewed(self, key: RunKey, lease: Lease) -> None:
        with self._renewed_lock:
            token = lease.token
            if token is None and (key, lease.owner) in self._renewed:
                token = self._renewed[(key, lease.owner)][0]
            self._renewed[(key, lease.owner)] = (token, time.monotonic())

    def _forget(self, key: RunKey, lease: Lease) -> None:
        with self._renewed_lock:
            noted = self._renewed.get((key, lease.owner))
            if noted is not None and (lease.token is None or noted[0] == lease.token):
                del self._renewed[(key, lease.owner)]

    def _renewal_due(self, key: RunKey, lease: Lease) -> bool:
        with self._renewed_lock:
            noted = self._renewed.get((key, lease.owner))
        if noted is None:
            return True
        token, last = noted
        if token is not None and lease.token is not None and token != lease.token:
            return True  # the lease of an earlier claim: the renewing UPDATE checks it (and fails)
        return time.monotonic() - last > lease.duration_s / 3

    # -- claiming -----------------------------------------------------------------------------
    def claim_due_runs(self, lease: Lease, limit: int, now: datetime | None = None) -> list[ClaimedRun]:
        """Claim up to ``limit`` due runs for ``lease.owner``, oldest due first, with their canvases."""
        now = now or utcnow()
        if limit <= 0:
            return []
        due = sa.or_(
            sa.and_(RUNS.c.state.in_((RunState.PENDING.value, RunState.WAITING.value)), RUNS.c.scheduled_time <= now),
            sa.and_(
                RUNS.c.state == RunState.RUNNING.value,
                sa.or_(RUNS.c.lease_expires.is_(None), RUNS.c.lease_expires < now),
            ),
        )
        pk = (RUNS.c.sandbox, RUNS.c.campaign_id, RUNS.c.run_id)
        candidates = sa.select(*pk).where(due).order_by(RUNS.c.scheduled_time, *pk).limit(limit)
        if self.database.is_postgres:
            with self.database.engine.begin() as conn:
                keys = [RunKey(*r) for r in conn.execute(candidates.with_for_update(skip_locked=True))]
                for key in keys:
                    self._take(conn, key, lease, now, sa.true())
                taken = [self._load_claimed(conn, key) for key in keys]
            for item in taken:
                self._note_renewed(item.run.key, lease.of_claim(item))
            return taken
        # SQLite: read the candidates, then take each with its own write transaction whose UPDATE
        # re-checks that the run is still due (a transaction that writes first never reads stale data).
        with self.database.engine.connect() as conn:
            keys = [RunKey(*r) for r in conn.execute(candidates)]
        claimed: list[ClaimedRun] = []
        for key in keys:
            with self.database.engine.begin() as conn:
                if not self._take(conn, key, lease, now, due):
                    continue
                claimed.append(self._load_claimed(conn, key))
            self._note_renewed(key, lease.of_claim(claimed[-1]))
        return claimed

    @staticmethod
    def _take(conn: sa.Connection, key: RunKey, lease: Lease, now: datetime, still_due: Any) -> bool:
        taken = conn.execute(
            RUNS.update()
            .where(*_key_where(RUNS, key), still_due)
            .values(
                state=RunState.RUNNING.value,
                start_time=sa.func.coalesce(RUNS.c.start_time, now),
                lease_owner=lease.owner,
                lease_expires=lease.expiry(now),
                fencing_token=RUNS.c.fencing_token + 1,
            )
        ).rowcount
        if taken:
            log_event(conn, key, f"claimed by replica {lease.owner}", now=now)
            conn.execute(
                CAMPAIGNS.update()
                .where(
                    CAMPAIGNS.c.sandbox == key.sandbox,
                    CAMPAIGNS.c.campaign_id == key.campaign_id,
                    CAMPAIGNS.c.state == CampaignState.SCHEDULED.value,
                )
                .values(state=CampaignState.LIVE.value, update_time=now)
            )
        return bool(taken)

    def _load_claimed(self, conn: sa.Connection, key: RunKey) -> ClaimedRun:
        canvas = conn.execute(
            sa.select(CAMPAIGNS.c.canvas).where(
                CAMPAIGNS.c.sandbox == key.sandbox, CAMPAIGNS.c.campaign_id == key.campaign_id
            )
        ).scalar_one()
        token = conn.execute(sa.select(RUNS.c.fencing_token).where(*_key_where(RUNS, key))).scalar_one()
        run = self._load_run(conn, key)
        assert run is not None
        return ClaimedRun(run=run, canvas=canvas_from_json(canvas), fencing_token=token)

    def renew_lease(self, key: RunKey, lease: Lease, now: datetime | None = None) -> bool:
        """Extend this replica's lease on a running run; False when it no longer owns the run."""
        now = now or utcnow()
        with self.database.engine.begin() as conn:
            renewed = self._renew(conn, key, lease, now, raise_lost=False)
        if renewed:
            self._note_renewed(key, lease)
        else:
            self._forget(key, lease)
        return renewed

    def release_lease(self, key: RunKey, lease: Lease, now: datetime | None = None) -> None:
        """Give a running run back (on shutdown): any replica may claim it at once."""
        now = now or utcnow()
        with self.database.engine.begin() as conn:
            conn.execute(
                RUNS.update()
                .where(*_key_where(RUNS, key), *_held(lease))
                .values(lease_expires=now - timedelta(microseconds=1))
            )
        self._forget(key, lease)

    @staticmethod
    def _renew(
        conn: sa.Connection, key: RunKey, lease: Lease, now: datetime, *, raise_lost: bool = True, extend: bool = True
    ) -> bool:
        """Extend the lease when it is still held; with ``extend`` False, only check it and lock the run's row."""
        renewed = conn.execute(
            RUNS.update()
            .where(*_key_where(RUNS, key), *_held(lease))
            .values(lease_expires=lease.expiry(now) if extend else RUNS.c.lease_expires)
        ).rowcount
        if not renewed and raise_lost:
            raise LeaseLost(f"{key.name} is no longer leased to {lease}")
        return bool(renewed)

    def _fence(self, conn: sa.Connection, key: RunKey, lease: Lease, now: datetime, *, exclusive: bool = False) -> None:
        """Check, first thing in a progress write's transaction, that ``lease`` still holds the run
        (:class:`LeaseLost` otherwise), renewing it when due; ``exclusive`` when the transaction goes on
        to change the run's row (see the module docstring)."""
        due = self._renewal_due(key, lease)
        if due or exclusive or not self.database.is_postgres:
            try:
                self._renew(conn, key, lease, now, extend=due)
            except LeaseLost:
                self._forget(key, lease)
                raise
            if due:
                # Noted before the commit: should the write not commit, the lease is renewed a third of
                # it later than planned (or by the heartbeat), still well before it expires.
                self._note_renewed(key, lease)
            return
        held = conn.execute(
            sa.select(RUNS.c.run_id).where(*_key_where(RUNS, key), *_held(lease)).with_for_update(read=True)
        ).first()
        if held is None:
            self._forget(key, lease)
            raise LeaseLost(f"{key.name} is no longer leased to {lease}")

    # -- progress (each write checks the lease, renewing it when due) ------------------------------------
    def start_task(self, key: RunKey, lease: Lease, activity: str, targeted: int | None = None) -> None:
        """Mark a task RUNNING (keeping its first start time); set ``targeted`` when given."""
        now = utcnow()
        values: dict[str, Any] = {
            "state": TaskState.RUNNING.value,
            "start_time": sa.func.coalesce(RUN_TASKS.c.start_time, now),
            "message": "",
        }
        if targeted is not None:
            values["targeted"] = targeted
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(conn, key, activity, **values)
            log_event(conn, key, "activity started", activity=activity, now=now)

    def record_working_set(self, key: RunKey, lease: Lease, activity: str, working_set: str, count: int) -> None:
        """A targeting task built its working set: store it and its count; the task SUCCEEDED."""
        note = f"working set {working_set} built: {count} records"
        self.record_outputs(key, lease, activity, {"": (working_set, count)}, note)

    def record_outputs(
        self, key: RunKey, lease: Lease, activity: str, outputs: Mapping[str, tuple[str, int]], note: str = ""
    ) -> None:
        """A targeting task built the working set of each of its outputs (``output -> (working set,
        count)``); the task SUCCEEDED, its main working set and count (``""``, else the first) stored."""
        now = utcnow()
        main = outputs.get("") or next(iter(outputs.values()), ("", 0))
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(
                conn,
                key,
                activity,
                state=TaskState.SUCCEEDED.value,
                working_set=main[0],
                targeted=main[1],
                end_time=now,
                outputs={output: count for output, (_, count) in outputs.items()},
                output_working_sets={output: name for output, (name, _) in outputs.items()},
            )
            summary = ", ".join(f"{output or 'main'} {count}" for output, (_, count) in outputs.items())
            log_event(conn, key, note or f"working sets built: {summary}", activity=activity, now=now)

    def record_ack(self, key: RunKey, lease: Lease, activity: str, ack: Ack, after: int = 0) -> bool:
        """Add an acknowledged batch's counts and move the checkpoint to its sequence, atomically; a
        batch with deferred recipients (positions ``after`` to its sequence) is kept to be sent again.

        Returns False (and changes nothing) when the checkpoint is already at or past the sequence.
        """
        now = utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            row = conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().one()
            if ack.sequence <= row["checkpoint"]:
                return False
            values: dict[str, Any] = {
                "sent": RUN_TASKS.c.sent + ack.sent,
                "already_sent": RUN_TASKS.c.already_sent + ack.already_sent,
                "skipped": _merge(row["skipped"], ack.skipped),
                "failed": _merge(row["failed"], ack.failed),
                "checkpoint": ack.sequence,
            }
            if ack.deferred:
                batch = DeferredBatch(
                    after, ack.sequence, ack.sent, ack.already_sent, dict(ack.skipped), dict(ack.failed)
                )
                batch.deferred, batch.next_window_time = ack.deferred, ack.next_window_time
                values["deferred"] = RUN_TASKS.c.deferred + ack.deferred
                values["deferred_batches"] = [*(row["deferred_batches"] or []), batch.to_json()]
            conn.execute(RUN_TASKS.update().where(*where, RUN_TASKS.c.checkpoint == row["checkpoint"]).values(**values))
        return True

    def record_replay(self, key: RunKey, lease: Lease, activity: str, ack: Ack) -> bool:
        """Record the acknowledgement of a deferred batch sent again: its newly sent recipients are
        added, its skip and failure counts replace the batch's earlier ones, and the batch is kept
        while recipients are still deferred. False (nothing changed) for a batch that is not deferred."""
        now = utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            row = conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().one()
            batches = [DeferredBatch.from_json(b) for b in row["deferred_batches"] or []]
            old = next((b for b in batches if b.sequence == ack.sequence), None)
            if old is None:
                return False
            skipped = replay_counts(row["skipped"], old.skipped, ack.skipped)
            failed = replay_counts(row["failed"], old.failed, ack.failed)
            # Recipients sent by an earlier replay whose acknowledgement was lost (a crash between
            # the send and this record) come back as already sent: count them once, as already sent.
            lost = max(0, ack.already_sent - old.sent - old.already_sent)
            old.sent += ack.sent
            old.already_sent += lost
            old.skipped, old.failed = dict(ack.skipped), dict(ack.failed)
            deferred = (row["deferred"] or 0) - old.deferred + ack.deferred
            old.deferred, old.next_window_time = ack.deferred, ack.next_window_time
            kept = [b.to_json() for b in batches if b.deferred]
            conn.execute(
                RUN_TASKS.update()
                .where(*where)
                .values(
                    sent=RUN_TASKS.c.sent + ack.sent,
                    already_sent=RUN_TASKS.c.already_sent + lost,
                    skipped=skipped,
                    failed=failed,
                    deferred=deferred,
                    deferred_batches=kept,
                )
            )
        return True

    def await_confirmation(self, key: RunKey, lease: Lease, activity: str, deadline: datetime) -> None:
        """A channel task WAITS for ConfirmActivity until ``deadline`` (then it gives up)."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(conn, key, activity, state=TaskState.WAITING.value, wake_time=deadline, confirmation=AWAITING)
            log_event(
                conn,
                key,
                f"waiting for a confirmation (ConfirmActivity) until {deadline.isoformat()} before sending",
                activity=activity,
                now=now,
            )

    def confirm(self, key: RunKey, activity: str, now: datetime | None = None) -> Task:
        """Confirm a channel task awaiting it: the run is due at once (ConfirmActivity).

        NOT_FOUND for an unknown run or activity; FAILED_PRECONDITION ``NOT_AWAITING_CONFIRMATION``.
        """
        now = now or utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        with self.database.engine.begin() as conn:
            if conn.execute(sa.select(RUNS.c.run_id).where(*_key_where(RUNS, key))).first() is None:
                raise NotFound(f"run {key.name!r} does not exist", field="run", reason="RUN_NOT_FOUND")
            confirmed = conn.execute(
                RUN_TASKS.update()
                .where(
                    *where,
                    RUN_TASKS.c.confirmation == AWAITING,
                    RUN_TASKS.c.state == TaskState.WAITING.value,
                    RUN_TASKS.c.wake_time > now,
                )
                .values(confirmation=CONFIRMED, wake_time=now)
            ).rowcount
            row = conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().first()
            if row is None:
                raise NotFound(
                    f"{key.name} has no activity {activity!r}", field="activity", reason="ACTIVITY_NOT_FOUND"
                )
            if not confirmed and row["confirmation"] == AWAITING and row["state"] == TaskState.WAITING.value:
                raise FailedPrecondition(
                    f"the confirmation of activity {activity!r} of {key.name} is past its time limit; it sends nothing",
                    field="activity",
                    reason="CONFIRMATION_EXPIRED",
                )
            if not confirmed:
                raise FailedPrecondition(
                    f"activity {activity!r} of {key.name} is not waiting for a confirmation",
                    field="activity",
                    reason="NOT_AWAITING_CONFIRMATION",
                )
            conn.execute(
                RUNS.update()
                .where(*_key_where(RUNS, key), RUNS.c.state == RunState.WAITING.value)
                .values(scheduled_time=now)
            )
            log_event(conn, key, "confirmed: the activity sends", activity=activity, now=now)
            return task_from_row(conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().one())

    def skip_recipients(self, key: RunKey, lease: Lease, activity: str, reason: str, count: int) -> None:
        """Count ``count`` recipients of a channel task as skipped with ``reason`` (none was sent)."""
        now = utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            row = conn.execute(sa.select(RUN_TASKS.c.skipped).where(*where)).mappings().one()
            conn.execute(RUN_TASKS.update().where(*where).values(skipped=_merge(row["skipped"], {reason: count})))
            log_event(
                conn, key, f"{count} recipients skipped: {reason}", activity=activity, level=LogLevel.WARNING, now=now
            )

    def deferred_batches(self, key: RunKey, activity: str) -> list[DeferredBatch]:
        """A channel task's batches with deferred recipients, in sequence order."""
        with self.database.engine.connect() as conn:
            stored = conn.execute(
                sa.select(RUN_TASKS.c.deferred_batches).where(
                    *_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity
                )
            ).scalar()
        return sorted((DeferredBatch.from_json(b) for b in stored or []), key=lambda b: b.sequence)

    def exclude_deferred(self, key: RunKey, lease: Lease, activity: str, reason: str) -> int:
        """The channel task's time limit passed: its deferred recipients are skipped with ``reason``
        (counted) and no batch is sent again. Returns how many were excluded."""
        now = utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            row = conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().one()
            excluded = int(row["deferred"] or 0)
            conn.execute(
                RUN_TASKS.update()
                .where(*where)
                .values(
                    skipped=_merge(row["skipped"], {reason: excluded}),
                    deferred=0,
                    deferred_batches=[],
                    wake_time=None,
                )
            )
            if excluded:
                log_event(
                    conn,
                    key,
                    f"time limit passed: {excluded} deferred recipients excluded ({reason})",
                    activity=activity,
                    level=LogLevel.WARNING,
                    now=now,
                )
        return excluded

    def finish_task(
        self, key: RunKey, lease: Lease, activity: str, note: str = "", outputs: Mapping[str, int] | None = None
    ) -> None:
        """Mark a task SUCCEEDED, with the records passed on by each output taken when given; the log
        entry gives its counts (or ``note``)."""
        now = utcnow()
        where = (*_key_where(RUN_TASKS, key), RUN_TASKS.c.activity == activity)
        values: dict[str, Any] = {"state": TaskState.SUCCEEDED.value, "end_time": now}
        if outputs is not None:
            values["outputs"] = dict(outputs)
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            conn.execute(RUN_TASKS.update().where(*where).values(**values))
            task = task_from_row(conn.execute(sa.select(RUN_TASKS).where(*where)).mappings().one())
            log_event(conn, key, note or f"activity succeeded: {_counts(task)}", activity=activity, now=now)

    def skip_task(self, key: RunKey, lease: Lease, activity: str, reason: str) -> None:
        """Mark a task SKIPPED (no branch leading to it was taken), with the reason."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(conn, key, activity, state=TaskState.SKIPPED.value, message=reason, end_time=now, outputs={})
            log_event(conn, key, f"skipped: {reason}", activity=activity, now=now)

    def wait_task(self, key: RunKey, lease: Lease, activity: str, wake: datetime) -> None:
        """A wait activity is WAITING until ``wake``."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(
                conn,
                key,
                activity,
                state=TaskState.WAITING.value,
                wake_time=wake,
                start_time=sa.func.coalesce(RUN_TASKS.c.start_time, now),
            )
            log_event(conn, key, f"waiting until {wake.isoformat()}", activity=activity, now=now)

    def suspend_run(self, key: RunKey, lease: Lease, wake: datetime) -> None:
        """The run WAITS for a wait activity: no replica holds it; it is due again at ``wake``, or at the
        earlier wake time of a waiting task (a confirmation given while the run was executing)."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now, exclusive=True)
            stored = as_utc(
                conn.execute(
                    sa.select(sa.func.min(RUN_TASKS.c.wake_time)).where(
                        *_key_where(RUN_TASKS, key), RUN_TASKS.c.state == TaskState.WAITING.value
                    )
                ).scalar()
            )
            wake = min(wake, stored) if stored is not None else wake
            conn.execute(
                RUNS.update()
                .where(*_key_where(RUNS, key))
                .values(state=RunState.WAITING.value, scheduled_time=wake, lease_owner=None, lease_expires=None)
            )
            log_event(conn, key, f"run waits until {wake.isoformat()}; no scheduler holds it meanwhile", now=now)
        self._forget(key, lease)

    def fail_task(self, key: RunKey, lease: Lease, activity: str, message: str) -> None:
        """A task FAILED while the run goes on (error handling ``ignore``)."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now)
            _update_task(conn, key, activity, state=TaskState.FAILED.value, message=message, end_time=now)
            log_event(conn, key, f"failed: {message}", activity=activity, level=LogLevel.ERROR, now=now)

    def suspend_failed_run(self, key: RunKey, lease: Lease, activity: str, message: str) -> None:
        """A task FAILED and the run is SUSPENDED (error handling ``suspend``): no replica holds it
        until RestartRun resumes it; its other tasks keep their states."""
        now = utcnow()
        error = f"activity {activity!r} failed: {message}"
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now, exclusive=True)
            _update_task(conn, key, activity, state=TaskState.FAILED.value, message=message, end_time=now)
            conn.execute(
                RUNS.update()
                .where(*_key_where(RUNS, key))
                .values(state=RunState.SUSPENDED.value, error=error, lease_owner=None, lease_expires=None)
            )
            log_event(
                conn, key, f"{error}; run suspended until restarted", activity=activity, level=LogLevel.ERROR, now=now
            )
        self._forget(key, lease)

    def fail_run(self, key: RunKey, lease: Lease, activity: str | None, message: str) -> None:
        """The run FAILED: the activity's task FAILED with ``message``, unfinished tasks SKIPPED.

        Without an activity (the scheduler itself failed), the tasks that were RUNNING fail instead.
        """
        now = utcnow()
        error = f"activity {activity!r} failed: {message}" if activity else message
        failing = (
            RUN_TASKS.c.activity == activity if activity is not None else RUN_TASKS.c.state == TaskState.RUNNING.value
        )
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now, exclusive=True)
            conn.execute(
                RUN_TASKS.update()
                .where(*_key_where(RUN_TASKS, key), failing)
                .values(state=TaskState.FAILED.value, message=message, end_time=now)
            )
            conn.execute(
                RUN_TASKS.update()
                .where(*_key_where(RUN_TASKS, key), RUN_TASKS.c.state.not_in(_FINISHED_TASKS))
                .values(state=TaskState.SKIPPED.value, end_time=now)
            )
            log_event(conn, key, error, activity=activity or "", level=LogLevel.ERROR, now=now)
            self._end(conn, key, RunState.FAILED, now, error)
        self._forget(key, lease)

    def succeed_run(self, key: RunKey, lease: Lease) -> None:
        """The run SUCCEEDED (every task finished)."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._fence(conn, key, lease, now, exclusive=True)
            log_event(conn, key, "run succeeded", now=now)
            self._end(conn, key, RunState.SUCCEEDED, now, "")
        self._forget(key, lease)

    @staticmethod
    def _end(conn: sa.Connection, key: RunKey, state: RunState, now: datetime, error: str) -> None:
        conn.execute(
            RUNS.update()
            .where(*_key_where(RUNS, key))
            .values(state=state.value, end_time=now, error=error, lease_owner=None, lease_expires=None)
        )
        # A once-scheduled campaign has one run: when it ends, the campaign is complete. A recurring
        # one completes when its last launch time has passed and its last run ends.
        complete_if_done(conn, key.sandbox, key.campaign_id, now)

    # -- reads --------------------------------------------------------------------------------
    def get(self, key: RunKey, field: str = "name") -> Run:
        """One run with its tasks in execution order; NOT_FOUND naming ``field``."""
        with self.database.engine.connect() as conn:
            run = self._load_run(conn, key)
        if run is None:
            raise NotFound(f"run {key.name!r} does not exist", field=field, reason="RUN_NOT_FOUND")
        return run

    def list_runs(
        self, sandbox: str, campaign_id: str, requested_size: int = 0, token: str = ""
    ) -> tuple[list[Run], str]:
        """One page of a campaign's runs, newest first; NOT_FOUND (``parent``) for an unknown campaign."""
        size = page_size(requested_size)
        after = decode_token(token)
        if after is not None and not (
            isinstance(after, list) and len(after) == 2 and all(isinstance(v, str) for v in after)
        ):
            raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token")
        query = sa.select(RUNS).where(RUNS.c.sandbox == sandbox, RUNS.c.campaign_id == campaign_id)
        if after is not None:
            try:
                created = datetime.fromisoformat(after[0]).astimezone(UTC)
            except ValueError:
                raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token") from None
            query = query.where(
                sa.or_(
                    RUNS.c.create_time < created,
                    sa.and_(RUNS.c.create_time == created, RUNS.c.run_id < after[1]),
                )
            )
        with self.database.engine.connect() as conn:
            exists = conn.execute(
                sa.select(CAMPAIGNS.c.campaign_id).where(
                    CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id
                )
            ).first()
            if exists is None:
                raise NotFound(f"campaign {campaign_id!r} does not exist", field="parent", reason="CAMPAIGN_NOT_FOUND")
            rows = (
                conn.execute(query.order_by(RUNS.c.create_time.desc(), RUNS.c.run_id.desc()).limit(size + 1))
                .mappings()
                .all()
            )
            tasks = self._load_tasks_of(conn, sandbox, campaign_id, [r["run_id"] for r in rows[:size]])
            runs = [run_from_row(r, tasks.get(r["run_id"], [])) for r in rows]
            canvas = self._canvas(conn, sandbox, campaign_id)
            if canvas is not None:
                for run in runs:
                    run.transitions = transition_counts(canvas, run.tasks)
        page = runs[:size]
        next_token = ""
        if len(runs) > size:
            last = page[-1]
            next_token = encode_token([last.create_time.isoformat(), last.key.run_id])
        return page, next_token

    def list_logs(self, key: RunKey, requested_size: int = 0, token: str = "") -> tuple[list[LogEntry], str]:
        """One page of a run's log, oldest first; NOT_FOUND (``parent``) for an unknown run."""
        with self.database.engine.connect() as conn:
            return list_logs(conn, key, requested_size, token)

    def snapshot(self, key: RunKey, after: int, limit: int = 1000) -> tuple[Run, list[LogEntry]]:
        """The run and up to ``limit`` of its log entries after sequence ``after``, read together."""
        with self.database.engine.connect() as conn:
            run = self._load_run(conn, key)
            if run is None:
                raise NotFound(f"run {key.name!r} does not exist", field="name", reason="RUN_NOT_FOUND")
            return run, entries_after(conn, key, after, limit)

    def _load_run(self, conn: sa.Connection, key: RunKey) -> Run | None:
        row = conn.execute(sa.select(RUNS).where(*_key_where(RUNS, key))).mappings().first()
        if row is None:
            return None
        run = run_from_row(row, self._load_tasks(conn, key))
        canvas = self._canvas(conn, key.sandbox, key.campaign_id)
        if canvas is not None:
            run.transitions = transition_counts(canvas, run.tasks)
        return run

    @staticmethod
    def _canvas(conn: sa.Connection, sandbox: str, campaign_id: str) -> Canvas | None:
        data = conn.execute(
            sa.select(CAMPAIGNS.c.canvas).where(CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
        ).scalar()
        return None if data is None else canvas_from_json(data)

    @staticmethod
    def _load_tasks_of(
        conn: sa.Connection, sandbox: str, campaign_id: str, run_ids: list[str]
    ) -> dict[str, list[Task]]:
        found: dict[str, list[Task]] = {}
        if not run_ids:
            return found
        rows = conn.execute(
            sa.select(RUN_TASKS)
            .where(
                RUN_TASKS.c.sandbox == sandbox,
                RUN_TASKS.c.campaign_id == campaign_id,
                RUN_TASKS.c.run_id.in_(run_ids),
            )
            .order_by(RUN_TASKS.c.run_id, RUN_TASKS.c.position)
        ).mappings()
        for r in rows:
            found.setdefault(r["run_id"], []).append(task_from_row(r))
        return found

    @staticmethod
    def _load_tasks(conn: sa.Connection, key: RunKey) -> list[Task]:
        rows = conn.execute(
            sa.select(RUN_TASKS).where(*_key_where(RUN_TASKS, key)).order_by(RUN_TASKS.c.position)
        ).mappings()
        return [task_from_row(r) for r in rows]
