"""Campaigns: create (idempotent on the request id), read, list, and publish.

Plain synchronous Python over SQLAlchemy; the servicer runs it on the database worker pool. Every
write is one transaction and happens only after validation, so bad input writes nothing. Publishing
is the transition ``draft → scheduled``: it creates the campaign's run, PENDING, with one PENDING
task per activity in execution order; the runner takes it from there (``scheduled → live`` when the
run starts, ``live → completed`` when it ends).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from carillon_chassis.names import new_id, validate_id
from carillon_chassis.pagination import decode_token, encode_token, page_size
from scheduler_svc.model import (
    Campaign,
    CampaignState,
    Canvas,
    RunKey,
    RunState,
    Schedule,
    TaskState,
    canvas_from_json,
    canvas_to_json,
)
from scheduler_svc.tables import CAMPAIGNS, RUN_TASKS, RUNS
from scheduler_svc.validation import Limits, topological_order, validate_campaign

MAX_REQUEST_ID = 100


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
    )


def _normalized(canvas: Canvas) -> Canvas:
    """The canvas with its start time in UTC (how timestamps are stored)."""
    start = canvas.schedule.start_time
    if start is None:
        return canvas
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    return Canvas(canvas.activities, canvas.transitions, Schedule(start, canvas.schedule.time_zone))


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
            "canvas": canvas_to_json(_normalized(canvas)),
            "request_id": request_id or None,
            "create_time": now,
            "update_time": now,
            "publish_time": None,
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

    def publish(self, sandbox: str, campaign_id: str, now: datetime | None = None) -> tuple[Campaign, RunKey]:
        """Move a draft to SCHEDULED and create its run (PENDING, one task per activity).

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
            scheduled = campaign.canvas.schedule.start_time or now
            conn.execute(
                RUNS.insert().values(
                    sandbox=sandbox,
                    campaign_id=campaign_id,
                    run_id=key.run_id,
                    state=RunState.PENDING.value,
                    scheduled_time=scheduled.astimezone(UTC),
                    create_time=now,
                    error="",
                )
            )
            conn.execute(
                RUN_TASKS.insert(),
                [
                    {
                        "sandbox": sandbox,
                        "campaign_id": campaign_id,
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
                    }
                    for position, activity in enumerate(topological_order(campaign.canvas))
                ],
            )
        return campaign, key

    # -- reads --------------------------------------------------------------------------------
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
        size = page_size(requested_size)
        after = decode_token(token)
        if after is not None and not isinstance(after, str):
            raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token")
        query = sa.select(CAMPAIGNS).where(CAMPAIGNS.c.sandbox == sandbox)
        if after is not None:
            query = query.where(CAMPAIGNS.c.campaign_id > after)
        with self.database.engine.connect() as conn:
            rows = conn.execute(query.order_by(CAMPAIGNS.c.campaign_id).limit(size + 1)).mappings().all()
        campaigns = [campaign_from_row(r) for r in rows[:size]]
        next_token = encode_token(campaigns[-1].campaign_id) if len(rows) > size else ""
        return campaigns, next_token

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
