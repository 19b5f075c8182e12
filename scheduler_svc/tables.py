"""The tables scheduler_svc owns: campaigns, runs and run tasks. Every row belongs to a sandbox.

Timestamps are stored in UTC (SQLite keeps no offset; :func:`carillon_chassis.database.as_utc`
restores it on read). A run's ``lease_owner`` and ``lease_expires`` say which scheduler replica is
executing it and until when; a run whose lease expired may be claimed by another replica. Its
``fencing_token`` counts its claims: the writes of an execution carry the token of its claim.
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
    # The next launch time of a published recurring campaign; NULL for a once schedule or when none is left.
    next_run_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class RunRow(SchedulerBase, table=True):
    """One execution of a campaign, and the lease of the replica executing it."""

    __tablename__ = "runs"
    __table_args__ = (
        sa.Index("ix_runs_due", "state", "scheduled_time"),
        sa.Index("ix_runs_campaign_created", "sandbox", "campaign_id", "create_time", "run_id"),
        # One run per launch time of a campaign, however many replicas create it.
        sa.Index("uq_runs_slot", "sandbox", "campaign_id", "slot_time", unique=True),
        # One run per SignalCampaign request id.
        sa.Index("uq_runs_request_id", "sandbox", "campaign_id", "request_id", unique=True),
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
    # The fencing token: incremented by every claim; the writes of an execution carry the token of its claim.
    fencing_token: int = Field(default=0, sa_type=sa.BigInteger)
    # The schedule's launch time this run executes (unique per campaign); NULL for other runs.
    slot_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # What created the run (``schedule`` or ``signal``), the signal's parameters and its request id.
    triggered_by: str = Field(default="schedule", max_length=16)
    parameters: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    request_id: str | None = Field(default=None, max_length=100)


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
    # Records passed on by each output taken ("" is the single output of most activities).
    outputs: dict[str, int] | None = Field(default=None, sa_type=sa.JSON)
    # When a waiting wait activity is due (or a channel activity sends its deferred recipients again).
    wake_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # The working set of each output of a targeting activity ("" is the main output).
    output_working_sets: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)
    # Recipients of a channel activity deferred to its send window's next opening, and their batches.
    deferred: int = Field(default=0, sa_type=sa.BigInteger)
    deferred_batches: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)
    # A channel activity's confirmation before sending: NULL (none asked), "awaiting" or "confirmed".
    confirmation: str | None = Field(default=None, max_length=16)


class RunLogRow(SchedulerBase, table=True):
    """One entry of a run's log: what happened, when, to which activity ("" for the run itself)."""

    __tablename__ = "run_logs"
    __table_args__ = (sa.Index("ix_run_logs_run", "sandbox", "campaign_id", "run_id", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    sandbox: str = Field(max_length=30)
    campaign_id: str = Field(max_length=63)
    run_id: str = Field(max_length=63)
    time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    level: str = Field(max_length=16)
    activity: str = Field(default="", max_length=63)
    message: str = Field(sa_type=sa.Text)


def _initial(conn: sa.Connection) -> None:
    SchedulerBase.metadata.create_all(conn)


def _add_missing(conn: sa.Connection, table: str, column: str, kind: Any = None, default: str = "") -> None:
    """Add a nullable column unless it exists (a database created after it was modelled has it)."""
    if column not in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
        sql_type = (kind if kind is not None else sa.DateTime(timezone=True)).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type} {default}".rstrip()))


def _add_unique_index(conn: sa.Connection, table: str, name: str, columns: str) -> None:
    if name not in {i["name"] for i in sa.inspect(conn).get_indexes(table)}:
        conn.execute(sa.text(f"CREATE UNIQUE INDEX {name} ON {table} ({columns})"))


def _recurring_schedules(conn: sa.Connection) -> None:
    _add_missing(conn, "campaigns", "next_run_time")
    _add_missing(conn, "runs", "slot_time")
    _add_unique_index(conn, "runs", "uq_runs_slot", "sandbox, campaign_id, slot_time")
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_campaigns_next_run ON campaigns (next_run_time)"))


def _signals(conn: sa.Connection) -> None:
    _add_missing(conn, "runs", "triggered_by", sa.String(16), "NOT NULL DEFAULT 'schedule'")
    _add_missing(conn, "runs", "parameters", sa.JSON())
    _add_missing(conn, "runs", "request_id", sa.String(100))
    _add_unique_index(conn, "runs", "uq_runs_request_id", "sandbox, campaign_id, request_id")


def _run_logs(conn: sa.Connection) -> None:
    RunLogRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _flow(conn: sa.Connection) -> None:
    _add_missing(conn, "run_tasks", "outputs", sa.JSON())
    _add_missing(conn, "run_tasks", "wake_time")


def _targeting_and_windows(conn: sa.Connection) -> None:
    _add_missing(conn, "run_tasks", "output_working_sets", sa.JSON())
    _add_missing(conn, "run_tasks", "deferred", sa.BigInteger(), "NOT NULL DEFAULT 0")
    _add_missing(conn, "run_tasks", "deferred_batches", sa.JSON())
    _add_missing(conn, "run_tasks", "confirmation", sa.String(16))


def _fencing_tokens(conn: sa.Connection) -> None:
    _add_missing(conn, "runs", "fencing_token", sa.BigInteger(), "NOT NULL DEFAULT 0")


MIGRATIONS = [
    Migration(1, "campaigns, runs, run tasks", _initial),
    Migration(2, "recurring schedules: next run time, one run per launch time", _recurring_schedules),
    Migration(3, "signal triggers: what created a run, its parameters and request id", _signals),
    Migration(4, "run logs", _run_logs),
    Migration(5, "flow activities: task outputs and wake times", _flow),
    Migration(
        6,
        "targeting outputs' working sets; deferred recipients and confirmations of channel activities",
        _targeting_and_windows,
    ),
    Migration(7, "fencing tokens: every claim of a run increments its token", _fencing_tokens),
]

# The Core tables, for statements that SQLModel's ORM layer does not type well.
CAMPAIGNS: sa.Table = CampaignRow.__table__  # type: ignore[attr-defined]
RUNS: sa.Table = RunRow.__table__  # type: ignore[attr-defined]
RUN_TASKS: sa.Table = RunTaskRow.__table__  # type: ignore[attr-defined]
RUN_LOGS: sa.Table = RunLogRow.__table__  # type: ignore[attr-defined]
