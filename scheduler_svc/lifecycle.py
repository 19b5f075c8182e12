"""Campaign lifecycle transitions after creation, editing of drafts, duplication, and signals.

Every transition is one transaction that first touches the campaign row (``update_time``): on
PostgreSQL that takes the row lock, on SQLite the database write lock, so two transitions of one
campaign never interleave, and the state read afterwards is the latest. An illegal transition raises
FAILED_PRECONDITION with reason ``ILLEGAL_TRANSITION`` (metadata: the state and the transition) and
writes nothing.

=====================  ======================================  ==================================
transition             from                                    effect
=====================  ======================================  ==================================
update                 draft (else CAMPAIGN_READ_ONLY)         new canvas, validated
stop                   scheduled, live, closed                 unfinished runs cancelled
close                  scheduled, live                         pending runs cancelled; completes
                                                               when the running ones end
archive                draft, completed, stopped               read-only
revert to draft        scheduled, live, closed, stopped,       pending runs cancelled; refused
                       completed                               once a message was sent
                                                               (MESSAGES_SENT) or while a run
                                                               runs (RUN_IN_PROGRESS)
delete                 draft                                   campaign and runs removed
=====================  ======================================  ==================================

Cancelling a RUNNING run moves it to CANCELLED and drops its lease: the replica executing it gets
:class:`~scheduler_svc.model.LeaseLost` on its next write (or heartbeat) and abandons it. A cancelled
run gives up its launch-time key, so the campaign can be published again after a revert to draft.

A signal (SignalCampaign) creates a run of a published signal-scheduled campaign now, idempotent on
its request id, and at most one per ``signal_min_interval_s`` (an hour by default, the reference
product's limit) per campaign; a repeat of a request id is never rate limited.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from carillon_chassis.names import new_id
from carillon_chassis.values import from_value
from scheduler_svc.campaigns import (
    MAX_REQUEST_ID,
    CampaignStore,
    campaign_from_row,
    complete_if_done,
    insert_run,
    normalized_canvas,
)
from scheduler_svc.model import (
    Campaign,
    CampaignState,
    Canvas,
    LogLevel,
    RunKey,
    RunState,
    RunTrigger,
    TaskState,
    canvas_to_json,
)
from scheduler_svc.runlog import log_event
from scheduler_svc.tables import CAMPAIGNS, RUN_LOGS, RUN_TASKS, RUNS
from scheduler_svc.validation import validate_campaign

UPDATABLE_FIELDS = ("display_name", "activities", "transitions", "schedule", "variables", "error_handling")
PARAMETER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_PARAMETERS = 100
_UNFINISHED_TASKS = (TaskState.PENDING.value, TaskState.RUNNING.value, TaskState.WAITING.value)

Apply = Callable[[sa.Connection, Campaign, datetime], None]


def _illegal(campaign: Campaign, transition: str, allowed: Sequence[CampaignState]) -> FailedPrecondition:
    return FailedPrecondition(
        f"{transition} is allowed from {', '.join(s.value for s in allowed)}; {campaign.name} is "
        f"{campaign.state.value}",
        field="name",
        reason="ILLEGAL_TRANSITION",
        metadata={"state": campaign.state.value, "transition": transition},
    )


def cancel_runs(
    conn: sa.Connection, sandbox: str, campaign_id: str, states: Sequence[RunState], now: datetime, why: str
) -> int:
    """Cancel the campaign's runs in ``states``: CANCELLED, lease dropped, launch-time key freed,
    unfinished tasks SKIPPED. Returns how many runs were cancelled."""
    where = (RUNS.c.sandbox == sandbox, RUNS.c.campaign_id == campaign_id, RUNS.c.state.in_([s.value for s in states]))
    run_ids = list(conn.execute(sa.select(RUNS.c.run_id).where(*where)).scalars())
    if not run_ids:
        return 0
    conn.execute(
        RUNS.update()
        .where(*where)
        .values(
            state=RunState.CANCELLED.value,
            end_time=now,
            error=why,
            lease_owner=None,
            lease_expires=None,
            slot_time=None,
        )
    )
    for run_id in run_ids:
        log_event(conn, RunKey(sandbox, campaign_id, run_id), f"run cancelled: {why}", level=LogLevel.WARNING, now=now)
    conn.execute(
        RUN_TASKS.update()
        .where(
            RUN_TASKS.c.sandbox == sandbox,
            RUN_TASKS.c.campaign_id == campaign_id,
            RUN_TASKS.c.run_id.in_(run_ids),
            RUN_TASKS.c.state.in_(_UNFINISHED_TASKS),
        )
        .values(state=TaskState.SKIPPED.value, end_time=now)
    )
    return len(run_ids)


class Lifecycle:
    """The transitions of the campaigns of one database, and signals."""

    def __init__(self, campaigns: CampaignStore, signal_min_interval_s: float = 3600.0) -> None:
        self.campaigns = campaigns
        self.database: Database = campaigns.database
        self.signal_min_interval_s = signal_min_interval_s

    # -- the transition frame -----------------------------------------------------------------
    def _transition(
        self,
        sandbox: str,
        campaign_id: str,
        transition: str,
        allowed: Sequence[CampaignState],
        apply: Apply,
    ) -> Campaign:
        now = utcnow()
        where = (CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
        with self.database.engine.begin() as conn:
            touched = conn.execute(CAMPAIGNS.update().where(*where).values(update_time=now)).rowcount
            if not touched:
                raise NotFound(f"campaign {campaign_id!r} does not exist", field="name", reason="CAMPAIGN_NOT_FOUND")
            campaign = campaign_from_row(conn.execute(sa.select(CAMPAIGNS).where(*where)).mappings().one())
            if campaign.state not in allowed:
                raise _illegal(campaign, transition, allowed)
            apply(conn, campaign, now)
            row = conn.execute(sa.select(CAMPAIGNS).where(*where)).mappings().first()
        if row is None:  # deleted
            return campaign
        return campaign_from_row(row)

    # -- transitions --------------------------------------------------------------------------
    def stop(self, sandbox: str, campaign_id: str) -> Campaign:
        """Stop a scheduled, live or closed campaign: its unfinished runs are cancelled (pending, running,
        and those waiting or suspended without a lease, which would otherwise wake and send)."""

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            unfinished = (RunState.PENDING, RunState.RUNNING, RunState.WAITING, RunState.SUSPENDED)
            cancel_runs(conn, sandbox, campaign_id, unfinished, now, "the campaign was stopped")
            _update(conn, sandbox, campaign_id, state=CampaignState.STOPPED.value, next_run_time=None)

        allowed = (CampaignState.SCHEDULED, CampaignState.LIVE, CampaignState.CLOSED)
        return self._transition(sandbox, campaign_id, "stop", allowed, apply)

    def close(self, sandbox: str, campaign_id: str) -> Campaign:
        """Close a scheduled or live campaign: no new run; completes when its running runs end."""

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            not_started = (RunState.PENDING, RunState.SUSPENDED)
            cancel_runs(conn, sandbox, campaign_id, not_started, now, "the campaign was closed")
            _update(conn, sandbox, campaign_id, state=CampaignState.CLOSED.value, next_run_time=None)
            complete_if_done(conn, sandbox, campaign_id, now)

        return self._transition(sandbox, campaign_id, "close", (CampaignState.SCHEDULED, CampaignState.LIVE), apply)

    def archive(self, sandbox: str, campaign_id: str) -> Campaign:
        """Archive a draft, completed or stopped campaign."""

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            _update(conn, sandbox, campaign_id, state=CampaignState.ARCHIVED.value)

        allowed = (CampaignState.DRAFT, CampaignState.COMPLETED, CampaignState.STOPPED)
        return self._transition(sandbox, campaign_id, "archive", allowed, apply)

    def revert_to_draft(self, sandbox: str, campaign_id: str) -> Campaign:
        """Return a published campaign to draft while none of its runs has sent a message or is running."""

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            sent = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(RUN_TASKS.c.sent + RUN_TASKS.c.already_sent), 0)).where(
                    RUN_TASKS.c.sandbox == sandbox, RUN_TASKS.c.campaign_id == campaign_id
                )
            ).scalar_one()
            if sent:
                raise FailedPrecondition(
                    f"{campaign.name} has sent {sent} messages; only a campaign that sent none returns to draft",
                    field="name",
                    reason="MESSAGES_SENT",
                    metadata={"sent": str(sent)},
                )
            running = conn.execute(
                sa.select(sa.func.count())
                .select_from(RUNS)
                .where(
                    RUNS.c.sandbox == sandbox,
                    RUNS.c.campaign_id == campaign_id,
                    RUNS.c.state == RunState.RUNNING.value,
                )
            ).scalar_one()
            if running:
                raise FailedPrecondition(
                    f"{campaign.name} has a run in progress; stop it first or wait for it to end",
                    field="name",
                    reason="RUN_IN_PROGRESS",
                )
            not_running = (RunState.PENDING, RunState.WAITING, RunState.SUSPENDED)
            cancel_runs(conn, sandbox, campaign_id, not_running, now, "the campaign returned to draft")
            _update(conn, sandbox, campaign_id, state=CampaignState.DRAFT.value, next_run_time=None, publish_time=None)

        allowed = (
            CampaignState.SCHEDULED,
            CampaignState.LIVE,
            CampaignState.CLOSED,
            CampaignState.STOPPED,
            CampaignState.COMPLETED,
        )
        return self._transition(sandbox, campaign_id, "revert to draft", allowed, apply)

    def delete(self, sandbox: str, campaign_id: str) -> None:
        """Delete a draft campaign with its runs and their tasks."""

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            for table in (RUN_TASKS, RUNS, CAMPAIGNS):
                conn.execute(table.delete().where(table.c.sandbox == sandbox, table.c.campaign_id == campaign_id))

        self._transition(sandbox, campaign_id, "delete", (CampaignState.DRAFT,), apply)

    def purge_archived(self, retention: timedelta, limit: int = 100, now: datetime | None = None) -> list[str]:
        """Delete campaigns archived longer ago than ``retention`` (in every sandbox), with their runs,
        tasks and run logs; at most ``limit`` per call, oldest first. Returns ``sandbox/campaigns/{id}``
        of each deleted campaign. Each campaign goes in its own transaction, and only while it is still
        archived, so a purge never removes anything else."""
        now = now or utcnow()
        cutoff = now - retention
        expired = (CAMPAIGNS.c.state == CampaignState.ARCHIVED.value, CAMPAIGNS.c.update_time < cutoff)
        with self.database.engine.connect() as conn:
            keys = conn.execute(
                sa.select(CAMPAIGNS.c.sandbox, CAMPAIGNS.c.campaign_id)
                .where(*expired)
                .order_by(CAMPAIGNS.c.update_time, CAMPAIGNS.c.sandbox, CAMPAIGNS.c.campaign_id)
                .limit(limit)
            ).all()
        purged: list[str] = []
        for sandbox, campaign_id in keys:
            with self.database.engine.begin() as conn:
                mine = (CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
                if not conn.execute(CAMPAIGNS.delete().where(*mine, *expired)).rowcount:
                    continue  # restored or purged by another replica meanwhile
                for table in (RUN_LOGS, RUN_TASKS, RUNS):
                    conn.execute(table.delete().where(table.c.sandbox == sandbox, table.c.campaign_id == campaign_id))
            purged.append(f"{sandbox}/campaigns/{campaign_id}")
        return purged

    def update(
        self, sandbox: str, campaign_id: str, display_name: str, canvas: Canvas, paths: Sequence[str]
    ) -> Campaign:
        """Change the fields of a draft named by ``paths`` (empty: every updatable field).

        INVALID_ARGUMENT for an unknown path or an invalid result (nothing is written);
        FAILED_PRECONDITION ``CAMPAIGN_READ_ONLY`` for a published campaign.
        """
        for i, path in enumerate(paths):
            if path not in UPDATABLE_FIELDS:
                raise InvalidArgument(
                    f"{path!r} cannot be updated; updatable fields: {', '.join(UPDATABLE_FIELDS)}",
                    field=f"update_mask.paths[{i}]",
                    reason="UNKNOWN_UPDATE_PATH",
                )
        fields = set(paths or UPDATABLE_FIELDS)
        limits = self.campaigns.limits

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            old = campaign.canvas
            merged = Canvas(
                activities=canvas.activities if "activities" in fields else old.activities,
                transitions=canvas.transitions if "transitions" in fields else old.transitions,
                schedule=canvas.schedule if "schedule" in fields else old.schedule,
                variables=canvas.variables if "variables" in fields else old.variables,
                error_handling=canvas.error_handling if "error_handling" in fields else old.error_handling,
            )
            name = display_name if "display_name" in fields else campaign.display_name
            validate_campaign(name, merged, limits)
            _update(conn, sandbox, campaign_id, display_name=name, canvas=canvas_to_json(normalized_canvas(merged)))

        try:
            return self._transition(sandbox, campaign_id, "update", (CampaignState.DRAFT,), apply)
        except FailedPrecondition as exc:
            if exc.reason != "ILLEGAL_TRANSITION":
                raise
            raise FailedPrecondition(
                f"a published campaign is read-only ({exc.metadata.get('state', '')}); "
                "revert it to draft or duplicate it to change it",
                field="campaign.name",
                reason="CAMPAIGN_READ_ONLY",
                metadata={"state": exc.metadata.get("state", "")},
            ) from None

    def duplicate(
        self, sandbox: str, campaign_id: str, new_campaign_id: str, display_name: str, request_id: str
    ) -> Campaign:
        """A new draft with the canvas and schedule of a campaign in any state; idempotent on ``request_id``."""
        original = self.campaigns.get(sandbox, campaign_id)
        return self.campaigns.create(
            sandbox, new_campaign_id, display_name or original.display_name, original.canvas, request_id
        )

    # -- test mode and restarts ---------------------------------------------------------------
    def test(self, sandbox: str, campaign_id: str, request_id: str = "") -> RunKey:
        """Create a test-mode run of a draft, due now: it runs for real except that channel
        activities send nothing (they record who would be sent). Idempotent on ``request_id``."""
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"at most {MAX_REQUEST_ID} characters", field="request_id")
        key = RunKey(sandbox, campaign_id, new_id("r"))
        found: list[RunKey] = []

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            earlier = _run_by_request_id(conn, sandbox, campaign_id, request_id) if request_id else None
            if earlier is not None:
                found.append(earlier)
                return
            if campaign.state != CampaignState.DRAFT:
                raise _illegal(campaign, "test", (CampaignState.DRAFT,))
            insert_run(
                conn, key, campaign.canvas, now, now, slot=None, trigger=RunTrigger.TEST, request_id=request_id or None
            )
            found.append(key)

        try:
            self._transition(sandbox, campaign_id, "test", tuple(CampaignState), apply)
        except IntegrityError:
            with self.database.engine.connect() as conn:
                earlier = _run_by_request_id(conn, sandbox, campaign_id, request_id)
            if earlier is None:
                raise
            return earlier
        return found[0]

    def restart(self, key: RunKey) -> RunKey:
        """Restart a run that ended or was suspended: a SUSPENDED run resumes in place; a test run that
        ended is replaced by a fresh test run of the draft's current canvas (a new run); a FAILED
        production run resumes in place — its unfinished tasks are pending
        again while checkpoints and counts are kept, so nobody is sent a message twice.

        FAILED_PRECONDITION: ``RUN_NOT_FINISHED`` (pending, running or waiting), ``ILLEGAL_TRANSITION`` (a test
        run of a campaign that is no longer a draft; a production run of a campaign that is not
        scheduled, live or completed — a completed one is live again), ``RUN_NOT_RESTARTABLE`` (a
        production run that did not fail).
        """
        created: list[RunKey] = []

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            row = conn.execute(sa.select(RUNS).where(*_run_where(key))).mappings().first()
            if row is None:
                raise NotFound(f"run {key.name!r} does not exist", field="name", reason="RUN_NOT_FOUND")
            state, trigger = RunState(row["state"]), RunTrigger(row["triggered_by"])
            if state in (RunState.PENDING, RunState.RUNNING, RunState.WAITING):
                raise FailedPrecondition(
                    f"{key.name} is {state.value}; only a run that ended can be restarted",
                    field="name",
                    reason="RUN_NOT_FINISHED",
                )
            if trigger == RunTrigger.TEST:
                if campaign.state != CampaignState.DRAFT:
                    raise _illegal(campaign, "restart a test run", (CampaignState.DRAFT,))
                if state == RunState.SUSPENDED:
                    _resume(conn, key, now)
                    created.append(key)
                    return
                fresh = RunKey(key.sandbox, key.campaign_id, new_id("r"))
                insert_run(conn, fresh, campaign.canvas, now, now, slot=None, trigger=RunTrigger.TEST)
                log_event(conn, fresh, f"restart of {key.name}", now=now)
                created.append(fresh)
                return
            resumable = (CampaignState.SCHEDULED, CampaignState.LIVE, CampaignState.COMPLETED)
            if campaign.state not in resumable:
                raise _illegal(campaign, "restart", resumable)
            if state not in (RunState.FAILED, RunState.SUSPENDED):
                raise FailedPrecondition(
                    f"{key.name} is {state.value}; only a failed or suspended run resumes",
                    field="name",
                    reason="RUN_NOT_RESTARTABLE",
                )
            _resume(conn, key, now)
            if campaign.state == CampaignState.COMPLETED:  # its failed run had ended it
                _update(conn, key.sandbox, key.campaign_id, state=CampaignState.LIVE.value)
            created.append(key)

        self._transition(key.sandbox, key.campaign_id, "restart", tuple(CampaignState), apply)
        return created[0]

    # -- signals ------------------------------------------------------------------------------
    def signal(
        self, sandbox: str, campaign_id: str, parameters: Mapping[str, value_pb2.Value], request_id: str
    ) -> RunKey:
        """Create a run of a published signal-scheduled campaign now, with ``parameters``."""
        if not request_id:
            raise InvalidArgument("a signal needs a request id (retries are safe with it)", field="request_id")
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"at most {MAX_REQUEST_ID} characters", field="request_id")
        if len(parameters) > MAX_PARAMETERS:
            raise InvalidArgument(f"at most {MAX_PARAMETERS} parameters", field="parameters")
        for name in sorted(parameters):
            if not PARAMETER_NAME.match(name):
                raise InvalidArgument(
                    "parameter names are lower case letters, digits and _, starting with a letter",
                    field=f"parameters[{name!r}]",
                )
            try:
                # Branch conditions read parameters as scalars: refuse lists, structs and bad values now.
                from_value(parameters[name])
            except (ValueError, ArithmeticError) as exc:
                raise InvalidArgument(
                    f"parameter {name!r} must be a valid scalar value (no list or struct): {exc}",
                    field=f"parameters[{name!r}]",
                ) from exc
        key = RunKey(sandbox, campaign_id, new_id("r"))
        found: list[RunKey] = []

        def apply(conn: sa.Connection, campaign: Campaign, now: datetime) -> None:
            earlier = conn.execute(
                sa.select(RUNS.c.run_id).where(
                    RUNS.c.sandbox == sandbox, RUNS.c.campaign_id == campaign_id, RUNS.c.request_id == request_id
                )
            ).scalar()
            if earlier is not None:
                found.append(RunKey(sandbox, campaign_id, earlier))
                return
            if campaign.state not in (CampaignState.SCHEDULED, CampaignState.LIVE):
                raise _illegal(campaign, "signal", (CampaignState.SCHEDULED, CampaignState.LIVE))
            if not campaign.canvas.schedule.signal:
                raise FailedPrecondition(
                    f"{campaign.name} runs on its schedule, not on signals",
                    field="name",
                    reason="NOT_SIGNAL_TRIGGERED",
                )
            last = conn.execute(
                sa.select(sa.func.max(RUNS.c.create_time)).where(
                    RUNS.c.sandbox == sandbox,
                    RUNS.c.campaign_id == campaign_id,
                    RUNS.c.triggered_by == RunTrigger.SIGNAL.value,
                )
            ).scalar()
            last = as_utc(last)
            limit = timedelta(seconds=self.signal_min_interval_s)
            if last is not None and now - last < limit:
                raise ResourceExhausted(
                    f"{campaign.name} accepts at most one signal every {self.signal_min_interval_s:g} s "
                    f"(signal_min_interval_s); the last one was at {last.isoformat()}",
                    field="name",
                    reason="SIGNAL_RATE_LIMITED",
                    metadata={"limit": "signal_min_interval_s", "value": f"{self.signal_min_interval_s:g}"},
                )
            insert_run(
                conn,
                key,
                campaign.canvas,
                now,
                now,
                slot=None,
                trigger=RunTrigger.SIGNAL,
                parameters=parameters,
                request_id=request_id,
            )
            found.append(key)

        allowed = tuple(CampaignState)  # the state is checked inside, after the idempotency check
        try:
            self._transition(sandbox, campaign_id, "signal", allowed, apply)
        except IntegrityError:
            # A concurrent repeat of the same request id created the run first.
            with self.database.engine.connect() as conn:
                earlier = conn.execute(
                    sa.select(RUNS.c.run_id).where(
                        RUNS.c.sandbox == sandbox, RUNS.c.campaign_id == campaign_id, RUNS.c.request_id == request_id
                    )
                ).scalar()
            if earlier is None:
                raise
            return RunKey(sandbox, campaign_id, earlier)
        return found[0]


def _run_where(key: RunKey) -> tuple[sa.ColumnElement[bool], ...]:
    return (RUNS.c.sandbox == key.sandbox, RUNS.c.campaign_id == key.campaign_id, RUNS.c.run_id == key.run_id)


def _task_where(key: RunKey) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        RUN_TASKS.c.sandbox == key.sandbox,
        RUN_TASKS.c.campaign_id == key.campaign_id,
        RUN_TASKS.c.run_id == key.run_id,
    )


def _resume(conn: sa.Connection, key: RunKey, now: datetime) -> None:
    """Resume a failed or suspended run in place: failed and skipped tasks are pending again; the
    checkpoints and counts stay, so the resumed run sends nobody a message twice."""
    conn.execute(
        RUN_TASKS.update()
        .where(*_task_where(key), RUN_TASKS.c.state.in_((TaskState.FAILED.value, TaskState.SKIPPED.value)))
        .values(state=TaskState.PENDING.value, message="", end_time=None)
    )
    conn.execute(
        RUNS.update()
        .where(*_run_where(key))
        .values(state=RunState.PENDING.value, error="", end_time=None, scheduled_time=now)
    )
    log_event(conn, key, "restarted: resumes from its checkpoints", now=now)


def _run_by_request_id(conn: sa.Connection, sandbox: str, campaign_id: str, request_id: str) -> RunKey | None:
    run_id = conn.execute(
        sa.select(RUNS.c.run_id).where(
            RUNS.c.sandbox == sandbox, RUNS.c.campaign_id == campaign_id, RUNS.c.request_id == request_id
        )
    ).scalar()
    return None if run_id is None else RunKey(sandbox, campaign_id, run_id)


def _update(conn: sa.Connection, sandbox: str, campaign_id: str, **values: object) -> None:
    conn.execute(
        CAMPAIGNS.update()
        .where(CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
        .values(**values)
    )
