"""The catalog tables audience_svc owns: entity schemas, working sets and saved audiences.

Every row belongs to a sandbox.

The entity tables (``ent_<hex>``), working-set tables (``ws_<hex>``), audience snapshot tables
(``aud_<hex>``) and processed-key tables of incremental queries (``pk_<hex>``) themselves are created at run
time from the catalog (see :mod:`audience_svc.schema` and :mod:`audience_svc.working_sets`); their
names are random, so they never collide and never depend on user input.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from carillon_chassis.database import Migration


class AudienceBase(SQLModel, registry=registry()):
    """Base of audience_svc's catalog tables, with its own metadata (no other service's tables)."""


class EntityRow(AudienceBase, table=True):
    """One entity schema and the name of the table that holds its records."""

    __tablename__ = "entities"
    sandbox: str = Field(primary_key=True, max_length=30)
    entity_id: str = Field(primary_key=True, max_length=63)
    table_name: str = Field(max_length=63, unique=True)
    display_name: str = ""
    # The attributes, primary key, version attribute and identity binding, as JSON.
    definition: str = Field(sa_type=sa.Text)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class WorkingSetRow(AudienceBase, table=True):
    """One working set: the population of one run's activity, stored in its own table."""

    __tablename__ = "working_sets"
    __table_args__ = (sa.UniqueConstraint("sandbox", "run", "activity", name="uq_working_sets_run_activity"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    working_set_id: str = Field(primary_key=True, max_length=63)
    table_name: str = Field(max_length=63, unique=True)
    run: str = Field(max_length=200)
    activity: str = Field(max_length=63)
    entity_id: str = Field(max_length=63)
    count: int = Field(default=0, sa_type=sa.BigInteger)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    expire_time: datetime = Field(sa_type=sa.DateTime(timezone=True), index=True)


class SavedAudienceRow(AudienceBase, table=True):
    """One saved audience: a definition (a query, evaluated when read) or a snapshot of members."""

    __tablename__ = "saved_audiences"
    sandbox: str = Field(primary_key=True, max_length=30)
    audience_id: str = Field(primary_key=True, max_length=63)
    display_name: str = ""
    entity_id: str = Field(max_length=63)
    # "definition" or "snapshot".
    kind: str = Field(max_length=20)
    # A definition's query, as JSON (see audience_svc.definitions); empty for a snapshot.
    definition: str = Field(default="", sa_type=sa.Text)
    # A snapshot's member table (aud_<hex>); empty for a definition.
    table_name: str = Field(default="", max_length=63)
    member_count: int = Field(default=0, sa_type=sa.BigInteger)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class IncrementalRunRow(AudienceBase, table=True):
    """One incremental build of a run's activity: its campaign, mode, what it left out and its watermark."""

    __tablename__ = "incremental_runs"
    __table_args__ = (sa.Index("ix_incremental_runs_campaign", "sandbox", "campaign", "activity", "entity_id"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    run: str = Field(primary_key=True, max_length=200)
    activity: str = Field(primary_key=True, max_length=63)
    campaign: str = Field(max_length=200)
    entity_id: str = Field(max_length=63)
    # "processed_keys" or "watermark".
    mode: str = Field(max_length=20)
    # Matching records left out because earlier runs produced them.
    excluded: int = Field(default=0, sa_type=sa.BigInteger)
    # Watermark mode: the attribute, the watermark this run started from and the one it leaves for
    # the next run (canonical text of a date or timestamp; empty for none).
    attribute: str = Field(default="", max_length=63)
    lower_bound: str = Field(default="", max_length=40)
    watermark: str = Field(default="", max_length=40)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class ProcessedKeyTableRow(AudienceBase, table=True):
    """The table of the keys one campaign activity has produced on one dimension (incremental query)."""

    __tablename__ = "processed_key_tables"
    sandbox: str = Field(primary_key=True, max_length=30)
    campaign: str = Field(primary_key=True, max_length=200)
    activity: str = Field(primary_key=True, max_length=63)
    entity_id: str = Field(primary_key=True, max_length=63)
    table_name: str = Field(max_length=63, unique=True)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    # The longest history window any build has used, in whole seconds rounded up; 0 is forever (never
    # purged) and NULL unknown (a table of an older release, until its next build; never purged).
    history_window_s: int | None = Field(default=None, sa_type=sa.BigInteger, nullable=True)


class ReconciliationRow(AudienceBase, table=True):
    """One reconciliation of a run's activity: its source, target, kept working set and counts.

    Written in the same transaction as the reconciled working set, so that reconciling the activity
    again returns the counts of that working set (not counts recomputed from the current data).
    """

    __tablename__ = "reconciliations"
    sandbox: str = Field(primary_key=True, max_length=30)
    run: str = Field(primary_key=True, max_length=200)
    activity: str = Field(primary_key=True, max_length=63)
    working_set_id: str = Field(max_length=63)
    source_working_set_id: str = Field(max_length=63)
    target_entity_id: str = Field(max_length=63)
    # The activity and working set of the unreconciled records kept (empty when they were not kept).
    unreconciled_activity: str = Field(default="", max_length=63)
    unreconciled_working_set_id: str = Field(default="", max_length=63)
    matched: int = Field(default=0, sa_type=sa.BigInteger)
    unmatched: int = Field(default=0, sa_type=sa.BigInteger)
    ambiguous: int = Field(default=0, sa_type=sa.BigInteger)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


def _initial(conn: sa.Connection) -> None:
    AudienceBase.metadata.create_all(
        conn,
        tables=[EntityRow.__table__, WorkingSetRow.__table__],  # type: ignore[attr-defined]
    )


def _saved_audiences(conn: sa.Connection) -> None:
    SavedAudienceRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _incremental(conn: sa.Connection) -> None:
    IncrementalRunRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
    ProcessedKeyTableRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _reconciliations(conn: sa.Connection) -> None:
    ReconciliationRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _processed_key_windows(conn: sa.Connection) -> None:
    # Migration 3 creates the table from the current model (with the column) on a new database.
    if "history_window_s" not in {c["name"] for c in sa.inspect(conn).get_columns("processed_key_tables")}:
        conn.execute(sa.text("ALTER TABLE processed_key_tables ADD COLUMN history_window_s BIGINT"))


MIGRATIONS = [
    Migration(1, "entities and working sets catalog", _initial),
    Migration(2, "saved audiences", _saved_audiences),
    Migration(3, "incremental query state", _incremental),
    Migration(4, "reconciliation counts", _reconciliations),
    Migration(5, "history window of processed-key tables", _processed_key_windows),
]
