"""The tables scheduler_svc owns: campaigns, runs and run tasks. Every row belongs to a sandbox.

Timestamps are stored in UTC (SQLite keeps no offset; :func:`carillon_chassis.database.as_utc`
restores it on read). A run's ``lease_owner`` and ``lease_expires`` say which scheduler replica is
executing it and until when; a run whose lease expired may be claimed by another replica.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from carillon_chassis.database import Migration


class SchedulerBase(SQLModel, registry=registry()):
    """Base of scheduler_svc's tables, with its own metadata (no other service's tables)."""


class CampaignRow(SchedulerBase, table=True):
    """A campaign: its canvas (in the scheduler's JSON format) and lifecycle state."""

    __tablename__ = "campaigns"
    __table_args__ = (sa.UniqueConstraint("sandbox", "request_id", name="uq_campaigns_request_id"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    campaign_id: str = Field(primary_key=True, max_length=63)
    display_name: str = Field(default="", max_length=200)
    state: str = Field(max_length=16)
    canvas: dict[str, Any] = Field(sa_type=sa.JSON)
    # The CreateCampaign request id; NULL when the request had none (NULLs never collide).
    request_id: str | None = Field(default=None, max_length=100)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    publish_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class RunRow(SchedulerBase, table=True):
    """One execution of a campaign, and the lease of the replica executing it."""

    __tablename__ = "runs"
    __table_args__ = (
        sa.Index("ix_runs_due", "state", "scheduled_time"),
        sa.Index("ix_runs_campaign_created", "sandbox", "campaign_id", "create_time", "run_id"),
    )
    sandbox: str = Field(primary_key=True, max_length=30)
    campaign_id: str = Field(primary_key=True, max_length=63)
    run_id: str = Field(primary_key=True, max_length=63)
    state: str = Field(max_length=16)
    scheduled_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    start_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    end_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    error: str = Field(default="", sa_type=sa.Text)
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class RunTaskRow(SchedulerBase, table=True):
    """The progress of one activity in one run: state, counts and the delivery checkpoint."""

    __tablename__ = "run_tasks"
    sandbox: str = Field(primary_key=True, max_length=30)
    campaign_id: str = Field(primary_key=True, max_length=63)
    run_id: str = Field(primary_key=True, max_length=63)
    activity: str = Field(primary_key=True, max_length=63)
    position: int
    state: str = Field(max_length=16)
    targeted: int = Field(default=0, sa_type=sa.BigInteger)
    sent: int = Field(default=0, sa_type=sa.BigInteger)
    already_sent: int = Field(default=0, sa_type=sa.BigInteger)
    skipped: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    failed: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    working_set: str = Field(default="", max_length=200)
    checkpoint: int = Field(default=0, sa_type=sa.BigInteger)
    message: str = Field(default="", sa_type=sa.Text)
    start_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    end_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


def _initial(conn: sa.Connection) -> None:
    SchedulerBase.metadata.create_all(conn)


MIGRATIONS = [Migration(1, "campaigns, runs, run tasks", _initial)]

# The Core tables, for statements that SQLModel's ORM layer does not type well.
CAMPAIGNS: sa.Table = CampaignRow.__table__  # type: ignore[attr-defined]
RUNS: sa.Table = RunRow.__table__  # type: ignore[attr-defined]
RUN_TASKS: sa.Table = RunTaskRow.__table__  # type: ignore[attr-defined]
