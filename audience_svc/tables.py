"""The catalog tables audience_svc owns: entity schemas and working sets. Every row belongs to a sandbox.

The entity tables (``ent_<hex>``) and working-set tables (``ws_<hex>``) themselves are created at run
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


def _initial(conn: sa.Connection) -> None:
    AudienceBase.metadata.create_all(conn)


MIGRATIONS = [Migration(1, "entities and working sets catalog", _initial)]
