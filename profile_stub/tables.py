"""The tables profile_stub owns. Every row belongs to a sandbox."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from carillon_chassis.database import Migration


class ProfileBase(SQLModel, registry=registry()):
    """Base of profile_stub's tables, with its own metadata (no other service's tables)."""


class ProfileRow(ProfileBase, table=True):
    """One person's thin profile."""

    __tablename__ = "profiles"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    first_name: str = ""
    last_name: str = ""
    locale: str = ""
    time_zone: str = ""
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class IdentityRow(ProfileBase, table=True):
    """One identity of a profile; an identity belongs to at most one profile per sandbox."""

    __tablename__ = "profile_identities"
    sandbox: str = Field(primary_key=True, max_length=30)
    namespace: str = Field(primary_key=True, max_length=63)
    value: str = Field(primary_key=True, max_length=320)
    profile_id: str = Field(max_length=63, index=True)


class ConsentRow(ProfileBase, table=True):
    """The consent of one profile on one channel."""

    __tablename__ = "consents"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    channel: str = Field(primary_key=True, max_length=20)
    state: str = Field(max_length=20)
    source: str = ""
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class PurposeConsentRow(ProfileBase, table=True):
    """The consent of one profile on one channel for a purpose other than "marketing" (which lives in
    ``consents``)."""

    __tablename__ = "purpose_consents"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    channel: str = Field(primary_key=True, max_length=20)
    purpose: str = Field(primary_key=True, max_length=63)
    state: str = Field(max_length=20)
    source: str = ""
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class CommunicationRow(ProfileBase, table=True):
    """One message sent, keyed by the delivery ledger's message id."""

    __tablename__ = "communications"
    # A profile's sends by time: the capping check reads only the recent ones (see _indexes_by_profile).
    __table_args__ = (sa.Index("ix_communications_profile_send_time", "profile_id", "send_time"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    message_id: str = Field(primary_key=True, max_length=120)
    profile_id: str = Field(max_length=63)
    channel: str = Field(max_length=20)
    category: str = Field(max_length=20)
    campaign: str = ""
    run: str = ""
    activity: str = ""
    send_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class QuarantineRow(ProfileBase, table=True):
    """The bounce state of one address on one channel."""

    __tablename__ = "address_quarantines"
    sandbox: str = Field(primary_key=True, max_length=30)
    channel: str = Field(primary_key=True, max_length=20)
    address: str = Field(primary_key=True, max_length=320)
    soft_bounces: int = 0
    quarantined: bool = False
    reason: str = ""
    quarantine_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    update_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class DeliveryEventRow(ProfileBase, table=True):
    """One delivery event already applied, keyed by its event id (for idempotency)."""

    __tablename__ = "delivery_events"
    sandbox: str = Field(primary_key=True, max_length=30)
    event_id: str = Field(primary_key=True, max_length=120)
    channel: str = Field(max_length=20)
    address: str = ""
    kind: str = Field(max_length=20)
    event_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class CappingRuleRow(ProfileBase, table=True):
    """At most ``max_messages`` marketing messages on ``channel`` (empty: every channel) per period."""

    __tablename__ = "capping_rules"
    sandbox: str = Field(primary_key=True, max_length=30)
    rule_id: str = Field(primary_key=True, max_length=63)
    channel: str = Field(default="", max_length=20)
    max_messages: int
    period: str = Field(max_length=10)
    time_basis: str = Field(max_length=10)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class ReservationRow(ProfileBase, table=True):
    """A marketing send reserved against the caps, not confirmed yet; ignored once expired."""

    __tablename__ = "send_reservations"
    sandbox: str = Field(primary_key=True, max_length=30)
    message_id: str = Field(primary_key=True, max_length=120)
    profile_id: str = Field(max_length=63, index=True)
    channel: str = Field(max_length=20)
    reserve_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    expire_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class ProfileCounterRow(ProfileBase, table=True):
    """One row per profile, written by every check-and-reserve on SQLite so that reservations serialize
    (the write takes SQLite's writer lock). On PostgreSQL reservers lock the profile's own row instead."""

    __tablename__ = "profile_counters"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    version: int = 0


class ProfileAttributeRow(ProfileBase, table=True):
    """One extra attribute of a profile (country, or a custom scalar), its value encoded as tagged JSON."""

    __tablename__ = "profile_attributes"
    sandbox: str = Field(primary_key=True, max_length=30)
    profile_id: str = Field(primary_key=True, max_length=63)
    name: str = Field(primary_key=True, max_length=63)
    value: str = ""


def _initial(conn: sa.Connection) -> None:
    ProfileBase.metadata.create_all(conn)


def _quarantine_and_capping(conn: sa.Connection) -> None:
    ProfileBase.metadata.create_all(conn)  # creates only the tables that do not exist yet


def _indexes_by_profile(conn: sa.Connection) -> None:
    """A profile's communications are indexed by profile and send time (the capping check reads its recent
    sends, whatever its history), replacing the index on the profile alone.

    Indexes by profile lead with the profile id, not the sandbox: a lookup by primary key (sandbox and
    message id, or identity) can then use no other index, and a lookup by profile checks the sandbox
    outside its index probe (profile_stub.keysets.per_key), so that no plan reads a sandbox's whole range
    per key, however stale the statistics (before a table's first ANALYZE, the planner cannot tell a
    condition on the sandbox from one on the key)."""
    table = ProfileBase.metadata.tables["communications"]
    (index,) = (index for index in table.indexes if index.name == "ix_communications_profile_send_time")
    index.create(conn, checkfirst=True)  # a database created after it was modelled has it
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_communications_profile_id"))


MIGRATIONS = [
    Migration(1, "profiles, identities, consents, communications", _initial),
    Migration(
        2,
        "quarantine, delivery events, capping rules, reservations, counters, attributes, purpose consents",
        _quarantine_and_capping,
    ),
    Migration(3, "communications indexed by profile and send time", _indexes_by_profile),
]
