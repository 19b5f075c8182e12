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
    """One message of a profile, keyed by the delivery ledger's message id: a communication sent (``expire_time``
    NULL: the profile's history), or a marketing send reserved against the caps and not confirmed yet
    (``expire_time`` set: it counts against the caps until then, and is no history). Recording a reserved
    message turns its row into the communication in place (an update, heap-only on PostgreSQL: see
    migration 4)."""

    __tablename__ = "communications"
    # A profile's rows by the time they count at against the caps: the capping check reads only the recent
    # ones, whatever the profile's history. Recording a reservation changes no indexed column (its count
    # time stays the reservation's; its send time, in no index, becomes the time sent), so that it is a
    # heap-only update (migration 4).
    __table_args__ = (sa.Index("ix_communications_profile_count_time", "profile_id", "count_time"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    message_id: str = Field(primary_key=True, max_length=120)
    profile_id: str = Field(max_length=63)
    channel: str = Field(max_length=20)
    category: str = Field(max_length=20)
    campaign: str = ""
    run: str = ""
    activity: str = ""
    send_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    expire_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=True)
    # When the send counts against the caps: the time it was reserved, or its send time when it was
    # recorded without a reservation. Never changed by recording (it is indexed: see __table_args__).
    count_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=True)


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
    sends, whatever its history), replacing the index on the profile alone. (Migration 4 replaced it in
    turn by an index on the profile alone, named otherwise.)

    Indexes by profile lead with the profile id, not the sandbox: a lookup by primary key (sandbox and
    message id, or identity) can then use no other index, and a lookup by profile checks the sandbox
    outside its index probe (profile_stub.keysets.per_key), so that no plan reads a sandbox's whole range
    per key, however stale the statistics (before a table's first ANALYZE, the planner cannot tell a
    condition on the sandbox from one on the key)."""
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_communications_profile_send_time ON communications (profile_id, send_time)"
        )
    )
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_communications_profile_id"))


# How full inserts fill each page of communications on PostgreSQL, in percent (migration 4). A batch's
# reservations are recorded in one transaction, so each page needs room for a second, slightly larger
# version of every row it holds (the recorded campaign): of 5,000 reservations recorded at once, all were
# heap-only updates at 45, 93% at 50, 43% at 70, none at 100 (the default). The history is then stored at
# about half density, as the delivery ledger is (its fillfactor 50).
COMMUNICATIONS_FILLFACTOR = 45


def _reservations_in_communications(conn: sa.Connection) -> None:
    """Reservations become rows of ``communications`` with an ``expire_time`` (see CommunicationRow): the
    column is added, the live and expired rows of ``send_reservations`` are moved there (category
    "marketing", no campaign, run or activity, sent at their reservation time), except those whose message
    id is recorded already, and ``send_reservations`` is dropped.

    The communications are indexed by profile and count time (``count_time``, added: the send time of
    the rows there), which recording a reservation (an update of its send time, campaign, run and
    activity) does not change; on PostgreSQL their pages keep room for that update (fillfactor), so that
    it is heap-only: the new row version stays in its page and no index gets an entry. Backfilling the
    count time rewrites the table once. A database created after this was modelled has the columns and
    the index already (version 1 creates the current tables)."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("communications")}
    column_type = sa.DateTime(timezone=True).compile(dialect=conn.dialect)
    for name in ("expire_time", "count_time"):
        if name not in present:
            conn.execute(sa.text(f"ALTER TABLE communications ADD COLUMN {name} {column_type}"))
    conn.execute(sa.text("UPDATE communications SET count_time = send_time WHERE count_time IS NULL"))
    table = ProfileBase.metadata.tables["communications"]
    (index,) = (index for index in table.indexes if index.name == "ix_communications_profile_count_time")
    index.create(conn, checkfirst=True)
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_communications_profile_send_time"))
    if sa.inspect(conn).has_table("send_reservations"):
        conn.execute(
            sa.text(
                "INSERT INTO communications (sandbox, message_id, profile_id, channel, category, campaign, run,"
                " activity, send_time, expire_time, count_time)"
                " SELECT r.sandbox, r.message_id, r.profile_id, r.channel, 'marketing', '', '', '',"
                " r.reserve_time, r.expire_time, r.reserve_time FROM send_reservations r"
                " WHERE NOT EXISTS (SELECT 1 FROM communications c"
                " WHERE c.sandbox = r.sandbox AND c.message_id = r.message_id)"
            )
        )
        conn.execute(sa.text("DROP TABLE send_reservations"))
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ALTER TABLE communications SET (fillfactor = {COMMUNICATIONS_FILLFACTOR})"))


MIGRATIONS = [
    Migration(1, "profiles, identities, consents, communications", _initial),
    Migration(
        2,
        "quarantine, delivery events, capping rules, reservations, counters, attributes, purpose consents",
        _quarantine_and_capping,
    ),
    Migration(3, "communications indexed by profile and send time", _indexes_by_profile),
    Migration(4, "reservations as communications not recorded yet", _reservations_in_communications),
]
