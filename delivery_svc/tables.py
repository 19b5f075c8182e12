"""The tables delivery_svc owns: templates and the send ledger. Every row belongs to a sandbox."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from carillon_chassis.database import Migration


class DeliveryBase(SQLModel, registry=registry()):
    """Base of delivery_svc's tables, with its own metadata (no other service's tables)."""


class TemplateRow(DeliveryBase, table=True):
    """A message template; ``content`` holds the channel's named parts (for email: subject, bodies...)."""

    __tablename__ = "templates"
    sandbox: str = Field(primary_key=True, max_length=30)
    template_id: str = Field(primary_key=True, max_length=63)
    channel: str = Field(max_length=20)
    display_name: str = Field(default="", max_length=200)
    content: dict[str, Any] = Field(sa_type=sa.JSON)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class LedgerRow(DeliveryBase, table=True):
    """One message of a channel activity: its key, its status and why, keyed by the message id.

    The unique key (sandbox, run, activity, profile key, entity key) allows one message per profile
    and working-set record; the id is also the provider's idempotency key.
    """

    __tablename__ = "send_ledger"
    __table_args__ = (
        sa.UniqueConstraint("sandbox", "run", "activity", "profile_key", "entity_key", name="uq_send_ledger_key"),
        sa.Index("ix_send_ledger_run_status", "sandbox", "run", "activity", "status"),
    )
    id: str = Field(primary_key=True, max_length=64)
    sandbox: str = Field(max_length=30)
    campaign: str = Field(max_length=200)
    run: str = Field(max_length=200)
    activity: str = Field(max_length=63)
    profile_key: str = Field(max_length=400)
    entity_key: str = Field(max_length=255)
    channel: str = Field(max_length=20)
    status: str = Field(max_length=16)
    reason: str = Field(default="", max_length=40)
    address: str = Field(default="", max_length=320)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


def _initial(conn: sa.Connection) -> None:
    DeliveryBase.metadata.create_all(conn)


MIGRATIONS = [Migration(1, "templates and the send ledger", _initial)]
