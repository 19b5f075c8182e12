"""Campaigns: create (idempotent on the request id), read, list, and publish.

Plain synchronous Python over SQLAlchemy; the servicer runs it on the database worker pool. Every
write is one transaction and happens only after validation, so bad input writes nothing. Publishing
is the transition ``draft → scheduled``: it creates the campaign's run, PENDING, with one PENDING
task per activity in execution order; the runner takes it from there (``scheduled → live`` when the
run starts, ``live → completed`` when it ends).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from carillon_chassis.names import new_id, validate_id
from carillon_chassis.pagination import keyset_page
from scheduler_svc.model import (
    Campaign,
    CampaignState,
    Canvas,
    RunKey,
    RunState,
    RunTrigger,
    Schedule,
    TaskState,
    canvas_from_json,
    canvas_to_json,
    parameters_to_json,
)
from scheduler_svc.runlog import log_event
from scheduler_svc.schedules import launch_times, next_launch, schedule_violations
from scheduler_svc.tables import CAMPAIGNS, RUN_TASKS, RUNS
from scheduler_svc.validation import Limits, topological_order, validate_campaign

MAX_REQUEST_ID = 100
DEFAULT_PREVIEW = 10
MAX_PREVIEW = 100

log = structlog.get_logger("carillon.scheduler.campaigns")

UNFINISHED_RUN_STATES = (
    RunState.PENDING.value,
    RunState.RUNNING.value,
    RunState.WAITING.value,
    RunState.SUSPENDED.value,
)
_COMPLETABLE = (CampaignState.SCHEDULED.value, CampaignState.LIVE.value, CampaignState.CLOSED.value)


def complete_if_done(conn: sa.Connection, sandbox: str, campaign_id: str, now: datetime) -> None:
    """Move a published campaign to COMPLETED when no run can start any more and none is unfinished.

    No run can start any more when a once or recurring campaign has no launch time left
    (``next_run_time`` NULL) or when the campaign is CLOSED; a signal-scheduled campaign stays open
    for signals until it is closed.
    """
    where = (CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
    row = conn.execute(sa.select(CAMPAIGNS.c.state, CAMPAIGNS.c.canvas).where(*where)).first()
    if row is None or row.state not in _COMPLETABLE:
        return
    if row.state != CampaignState.CLOSED.value and canvas_from_json(row.canvas).schedule.signal:
        return
    unfinished = (
        sa.select(RUNS.c.run_id)
        .where(
            RUNS.c.sandbox == sandbox,
            RUNS.c.campaign_id == campaign_id,
            RUNS.c.state.in_(UNFINISHED_RUN_STATES),
        )
        .exists()
    )
    conn.execute(
        CAMPAIGNS.update()
        .where(*where, CAMPAIGNS.c.state.in_(_COMPLETABLE), CAMPAIGNS.c.next_run_time.is_(None), ~unfinished)
        .values(state=CampaignState.COMPLETED.value, update_time=now)
    )


def campaign_from_row(row: Any) -> Campaign:
    """The domain campaign of a ``campaigns`` row mapping."""
    return Campaign(
        campaign_id=row["campaign_id"],
        display_name=row["display_name"],
        state=CampaignState(row["state"]),
        canvas=canvas_from_json(row["canvas"]),
        create_time=as_utc(row["create_time"]) or utcnow(),
        update_time=as_utc(row["update_time"]) or utcnow(),
        publish_time=as_utc(row["publish_time"]),
        next_run_time=as_utc(row["next_run_time"]),
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def normalized_canvas(canvas: Canvas) -> Canvas:
    """The canvas with its schedule's instants in UTC (how timestamps are stored)."""
    s = canvas.schedule
    schedule = dataclasses.replace(
        s, start_time=_utc(s.start_time), valid_from=_utc(s.valid_from), valid_until=_utc(s.valid_until)
    )
    return dataclasses.replace(canvas, schedule=schedule)


def insert_run(
    conn: sa.Connection,
    key: RunKey,
    canvas: Canvas,
    scheduled: datetime,
    now: datetime,
    slot: datetime | None,
    *,
    trigger: RunTrigger = RunTrigger.SCHEDULE,
    parameters: Mapping[str, value_pb2.Value] | None = None,
    request_id: str | None = None,
) -> None:
    """Insert a PENDING run due at ``scheduled`` with one PENDING task per activity in execution order.

    ``slot`` is the recurring schedule's launch time it executes: a second run of the same slot
    violates ``uq_runs_slot``, and a second run of the same signal ``request_id`` violates
    ``uq_runs_request_id`` (IntegrityError).
    """
    conn.execute(
        RUNS.insert().values(
            sandbox=key.sandbox,
            campaign_id=key.campaign_id,
            run_id=key.run_id,
            state=RunState.PENDING.value,
            scheduled_time=scheduled.astimezone(UTC),
            create_time=now,
            error="",
            slot_time=slot.astimezone(UTC) if slot else None,
            triggered_by=trigger.value,
            parameters=parameters_to_json(parameters) if parameters is not None else None,
            request_id=request_id,
        )
    )
    if trigger == RunTrigger.SIGNAL:
        log_event(conn, key, f"run created by a signal (request id {request_id})", now=now)
    else:
        log_event(conn, key, f"run created by the schedule, due at {scheduled.astimezone(UTC).isoformat()}", now=now)
    conn.execute(
        RUN_TASKS.insert(),
        [
            {
                "sandbox": key.sandbox,
                "campaign_id": key.campaign_id,
                "run_id": key.run_id,
                "activity": activity,
                "position": position,
                "state": TaskState.PENDING.value,
                "targeted": 0,
                "sent": 0,
                "already_sent": 0,
                "skipped": {},
                "failed": {},
                "working_set": "",
                "checkpoint": 0,
                "message": "",
                "outputs": {},
            }
            for position, activity in enumerate(topological_order(canvas))
        ],
    )


class CampaignStore:
    """The campaigns of one database."""

    def __init__(self, database: Database, limits: Limits | None = None) -> None:
        self.database = database
        self.limits = limits or Limits()

    # -- writes -------------------------------------------------------------------------------
    def create(
        self, sandbox: str, campaign_id: str, display_name: str, canvas: Canvas, request_id: str = ""
    ) -> Campaign:
        """Create a draft campaign; a repeated ``request_id`` returns the campaign it created first.

        Raises INVALID_ARGUMENT or RESOURCE_EXHAUSTED for a bad campaign (nothing is written) and
        ALREADY_EXISTS when another request took the id.
        """
        if campaign_id:
            validate_id(campaign_id, "campaign_id")
        if len(request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"at most {MAX_REQUEST_ID} characters", field="request_id")
        validate_campaign(display_name, canvas, self.limits)
        if request_id:
            earlier = self._by_request_id(sandbox, request_id)
            if earlier is not None:
                return earlier
        campaign_id = campaign_id or new_id("c")
        now = utcnow()
        row = {
            "sandbox": sandbox,
            "campaign_id": campaign_id,
            "display_name": display_name,
            "state": CampaignState.DRAFT.value,
            "canvas": canvas_to_json(normalized_canvas(canvas)),
            "request_id": request_id or None,
            "create_time": now,
            "update_time": now,
            "publish_time": None,
            "next_run_time": None,
        }
        try:
            with self.database.engine.begin() as conn:
                conn.execute(CAMPAIGNS.insert().values(**row))
        except IntegrityError:
            # Either the id is taken, or a concurrent retry of the same request won the race.
            if request_id:
                earlier = self._by_request_id(sandbox, request_id)
                if earlier is not None:
                    return earlier
            raise AlreadyExists(
                f"campaign {campaign_id!r} already exists", field="campaign_id", reason="CAMPAIGN_EXISTS"
            ) from None
        return campaign_from_row(row)

    def publish(self, sandbox: str, campaign_id: str, now: datetime | None = None) -> tuple[Campaign, RunKey | None]:
        """Move a draft to SCHEDULED and create its run (PENDING, one task per activity); a
        signal-scheduled campaign gets no run (None) until it is signalled.

        The run is due at the once schedule's start time, or now. Raises NOT_FOUND, or
        FAILED_PRECONDITION (reason ``ILLEGAL_TRANSITION``) when the campaign is not a draft.
        """
        now = now or utcnow()
        key = RunKey(sandbox, campaign_id, new_id("r"))
        where = (CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
        with self.database.engine.begin() as conn:
            moved = conn.execute(
                CAMPAIGNS.update()
                .where(*where, CAMPAIGNS.c.state == CampaignState.DRAFT.value)
                .values(state=CampaignState.SCHEDULED.value, publish_time=now, update_time=now)
            ).rowcount
            row = conn.execute(sa.select(CAMPAIGNS).where(*where)).mappings().first()
            if row is None:
                raise NotFound(f"campaign {campaign_id!r} does not exist", field="name", reason="CAMPAIGN_NOT_FOUND")
            campaign = campaign_from_row(row)
            if moved == 0:
                raise FailedPrecondition(
                    f"only a draft campaign can be published; {campaign.name} is {campaign.state.value}",
                    field="name",
                    reason="ILLEGAL_TRANSITION",
                    metadata={"state": campaign.state.value, "transition": "publish"},
                )
            schedule = campaign.canvas.schedule
            if schedule.signal:
                # Runs only when signalled (SignalCampaign): no run yet.
                return campaign, None
            if schedule.recurrence is None:
                # One run; no launch-time key, so that a campaign returned to draft can be published again.
                insert_run(conn, key, campaign.canvas, schedule.start_time or now, now, slot=None)
                return campaign, key
            # A recurring campaign: its first run is due at the first launch time from now on, and
            # the runner creates each later run when its launch time comes (create_due_runs).
            first = next_launch(schedule, now - timedelta(microseconds=1))
            if first is None:
                raise FailedPrecondition(
                    f"the schedule of {campaign.name} has no launch time left (validity window)",
                    field="campaign.schedule",
                    reason="SCHEDULE_EXHAUSTED",
                )
            following = next_launch(schedule, first)
            conn.execute(CAMPAIGNS.update().where(*where).values(next_run_time=following))
            insert_run(conn, key, campaign.canvas, first, now, slot=first)
            campaign.next_run_time = following
        return campaign, key

    def create_due_runs(self, grace_s: float, limit: int = 500, now: datetime | None = None) -> list[RunKey]:
        """Create the run of every published recurring campaign whose next launch time has come.

        Each campaign is handled in its own transaction that first moves ``next_run_time`` from the
        value read to the first launch time after ``now`` (a compare-and-set: a replica that lost the
        race changes nothing), then inserts the run, unique per (campaign, launch time). A launch time
        missed by more than ``grace_s`` (the scheduler was down) gets no run: the campaign rolls over
        to its next launch time, so an outage never causes a burst of catch-up runs. A campaign with
        no launch time left completes once its last run has ended.
        """
        now = now or utcnow()
        active = CAMPAIGNS.c.state.in_((CampaignState.SCHEDULED.value, CampaignState.LIVE.value))
        with self.database.engine.connect() as conn:
            due = (
                conn.execute(
                    sa.select(CAMPAIGNS)
                    .where(active, CAMPAIGNS.c.next_run_time.is_not(None), CAMPAIGNS.c.next_run_time <= now)
                    .order_by(CAMPAIGNS.c.next_run_time)
                    .limit(limit)
                )
                .mappings()
                .all()
            )
        created: list[RunKey] = []
        for row in due:
            campaign = campaign_from_row(row)
            slot = campaign.next_run_time
            assert slot is not None
            following = next_launch(campaign.canvas.schedule, max(slot, now))
            key = RunKey(row["sandbox"], campaign.campaign_id, new_id("r"))
            where = (CAMPAIGNS.c.sandbox == key.sandbox, CAMPAIGNS.c.campaign_id == key.campaign_id)
            try:
                with self.database.engine.begin() as conn:
                    moved = conn.execute(
                        CAMPAIGNS.update()
                        .where(*where, active, CAMPAIGNS.c.next_run_time == row["next_run_time"])
                        .values(next_run_time=following, update_time=now)
                    ).rowcount
                    if not moved:
                        continue
                    if slot >= now - timedelta(seconds=grace_s):
                        insert_run(conn, key, campaign.canvas, slot, now, slot=slot)
                        created.append(key)
                    else:
                        log.warning(
                            "launch time missed; rolled over to the next one",
                            campaign=campaign.name,
                            missed=slot.isoformat(),
                            next=following.isoformat() if following else None,
                        )
                    if following is None:
                        complete_if_done(conn, key.sandbox, key.campaign_id, now)
            except IntegrityError:
                # Another replica created this launch time's run: nothing to do.
                continue
        return created

    # -- reads --------------------------------------------------------------------------------
    def preview_schedule(
        self,
        sandbox: str,
        campaign_id: str,
        schedule: Schedule | None,
        count: int = 0,
        after: datetime | None = None,
    ) -> list[datetime]:
        """The next ``count`` (default 10, at most 100) launch times after ``after`` (default now).

        Of the named campaign's schedule, or of ``schedule``: exactly one is given, else
        INVALID_ARGUMENT; an invalid schedule is INVALID_ARGUMENT naming its fields.
        """
        if bool(campaign_id) == (schedule is not None):
            raise InvalidArgument("set exactly one of name and schedule", field="name", reason="NAME_OR_SCHEDULE")
        if not 0 <= count <= MAX_PREVIEW:
            raise InvalidArgument(f"0 (the default, {DEFAULT_PREVIEW}) or 1 to {MAX_PREVIEW}", field="count")
        if schedule is None:
            schedule = self.get(sandbox, campaign_id).canvas.schedule
        else:
            schedule = normalized_canvas(Canvas(schedule=schedule)).schedule
            minimum = self.limits.min_schedule_interval_minutes
            violations = schedule_violations(schedule, "schedule", minimum)
            if violations:
                raise InvalidArgument(
                    f"invalid schedule: {violations[0].field}: {violations[0].description}",
                    violations=violations,
                    reason="INVALID_SCHEDULE",
                )
        return launch_times(schedule, _utc(after) or utcnow(), count or DEFAULT_PREVIEW)

    def get(self, sandbox: str, campaign_id: str, field: str = "name") -> Campaign:
        """One campaign; NOT_FOUND naming ``field`` when there is none."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(CAMPAIGNS).where(CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.campaign_id == campaign_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"campaign {campaign_id!r} does not exist", field=field, reason="CAMPAIGN_NOT_FOUND")
        return campaign_from_row(row)

    def list_campaigns(self, sandbox: str, requested_size: int = 0, token: str = "") -> tuple[list[Campaign], str]:
        """One page of campaigns in id order, and the token of the next page ("" on the last)."""
        with self.database.engine.connect() as conn:
            rows, next_token = keyset_page(
                conn, CAMPAIGNS, CAMPAIGNS.c.campaign_id, [CAMPAIGNS.c.sandbox == sandbox], requested_size, token
            )
        return [campaign_from_row(r) for r in rows], next_token

    def _by_request_id(self, sandbox: str, request_id: str) -> Campaign | None:
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(CAMPAIGNS).where(CAMPAIGNS.c.sandbox == sandbox, CAMPAIGNS.c.request_id == request_id)
                )
                .mappings()
                .first()
            )
        return None if row is None else campaign_from_row(row)
