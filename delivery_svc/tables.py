"""The tables delivery_svc owns: templates, the send ledger, feedback events and the message log
outbox. Every row belongs to a sandbox."""

from __future__ import annotations

import json
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
        # The only index on (sandbox, run, activity, ...): a second one (with the status, dropped by
        # migration 4) let the planner, while a fast-growing run's statistics lagged, look keys up by
        # scanning the activity's every row. Reports read the activity's rows through this one.
        sa.UniqueConstraint("sandbox", "run", "activity", "profile_key", "entity_key", name="uq_send_ledger_key"),
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
    # A deferred row (outside the send window) waits until this time.
    defer_until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # When the provider accepted the message.
    sent_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # First time of each kind of feedback (null until reported).
    delivered_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    open_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    click_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    bounce_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    complaint_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    unsubscribe_time: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    # "soft" or "hard" once the message bounced; a hard bounce is never downgraded.
    bounce_kind: str = Field(default="", max_length=8)
    # The recipient's identity as the scheduler sent it (for message logs); empty on rows written
    # before migration 3.
    identity_namespace: str = Field(default="", max_length=63)
    identity_value: str = Field(default="", max_length=320)


class MessageLogBatchRow(DeliveryBase, table=True):
    """Message log events (``sent``, ``failed``, ``delivered``, ``opened``, ``clicked``, ``bounced``) not
    yet accepted by audience_svc: the events of one ledger change of one status and event time, as
    one row whose ``message_ids`` holds their ids (a JSON array). Written in the same transaction as
    the ledger change it reports, deleted once RecordMessageLogs accepted every event in it. The rest
    of a log (campaign, identity, ...) is the ledger row's. One row per batch instead of one per
    message: queueing and deleting the logs of a 5,000-message batch is one row each.
    """

    __tablename__ = "message_log_batches"
    __table_args__ = (sa.Index("ix_message_log_batches_due", "next_attempt_time"),)
    # Creation order, which the flusher follows (SQLite: an INTEGER PRIMARY KEY is the rowid).
    id: int | None = Field(default=None, primary_key=True, sa_type=sa.BigInteger().with_variant(sa.Integer, "sqlite"))
    sandbox: str = Field(max_length=30)
    status: str = Field(max_length=16)
    event_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    message_ids: str = Field(sa_type=sa.Text)
    # What the logs say about their messages (campaign, identity...: see delivery_svc.ledger), so that
    # sending them reads no ledger row; null when not known (rows moved by migration 6).
    details: str | None = Field(default=None, sa_type=sa.Text)
    size: int
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    # Failed deliveries to audience_svc so far, and when the next attempt is due.
    attempts: int = Field(default=0)
    next_attempt_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class _LegacyBase(SQLModel, registry=registry()):
    """Tables of earlier versions that migrations create and drop again (not in DeliveryBase's
    metadata, so that a fresh database does not get them from migration 1)."""


class MessageLogOutboxRow(_LegacyBase, table=True):
    """Versions 3 to 5: one message log event per row (replaced by :class:`MessageLogBatchRow`)."""

    __tablename__ = "message_log_outbox"
    __table_args__ = (sa.Index("ix_message_log_outbox_due", "next_attempt_time"),)
    sandbox: str = Field(primary_key=True, max_length=30)
    message_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(primary_key=True, max_length=16)
    event_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    attempts: int = Field(default=0)
    next_attempt_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


class FeedbackEventRow(DeliveryBase, table=True):
    """A recorded feedback event, keyed by its id so that a repeat is recognised and ignored.

    ``forwarded`` is set once the event's consequences reached the profile service, so that a retry
    of an event whose forwarding failed forwards it again.
    """

    __tablename__ = "feedback_events"
    sandbox: str = Field(primary_key=True, max_length=30)
    event_id: str = Field(primary_key=True, max_length=200)
    message_id: str = Field(max_length=64, index=True)
    kind: str = Field(max_length=20)
    event_time: datetime = Field(sa_type=sa.DateTime(timezone=True))
    detail: str = Field(default="", max_length=1000)
    forwarded: bool = Field(default=False)
    create_time: datetime = Field(sa_type=sa.DateTime(timezone=True))


# The ledger columns added by migration 2, with their DDL type.
_LEDGER_COLUMNS_V2 = (
    *(
        (name, "TIMESTAMP WITH TIME ZONE")
        for name in (
            "defer_until",
            "sent_time",
            "delivered_time",
            "open_time",
            "click_time",
            "bounce_time",
            "complaint_time",
            "unsubscribe_time",
        )
    ),
    ("bounce_kind", "VARCHAR(8) NOT NULL DEFAULT ''"),
)


def _initial(conn: sa.Connection) -> None:
    DeliveryBase.metadata.create_all(conn)


def _feedback(conn: sa.Connection) -> None:
    """Add the send-window and feedback columns to a ledger created by version 1, and the events table.

    A database created fresh already has them (version 1 creates the current tables), so each column
    is added only when missing.
    """
    present = {column["name"] for column in sa.inspect(conn).get_columns("send_ledger")}
    for name, ddl in _LEDGER_COLUMNS_V2:
        if name not in present:
            conn.execute(sa.text(f"ALTER TABLE send_ledger ADD COLUMN {name} {ddl}"))
    FeedbackEventRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _message_logs(conn: sa.Connection) -> None:
    """Add the recipient identity to the ledger and create the message log outbox (each only when
    missing: a database created fresh by version 1 already has them)."""
    present = {column["name"] for column in sa.inspect(conn).get_columns("send_ledger")}
    for name, size in (("identity_namespace", 63), ("identity_value", 320)):
        if name not in present:
            conn.execute(sa.text(f"ALTER TABLE send_ledger ADD COLUMN {name} VARCHAR({size}) NOT NULL DEFAULT ''"))
    MessageLogOutboxRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _one_ledger_key_index(conn: sa.Connection) -> None:
    """Drop the (sandbox, run, activity, status) index of versions 1-3 (see LedgerRow)."""
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_send_ledger_run_status"))


def _room_for_status_updates(conn: sa.Connection) -> None:
    """On PostgreSQL, leave room in each ledger page so that a row's status change (pending, then sent)
    is a heap-only update: the new row version stays in the page and neither index is touched (the
    status is in no index). A full page moves the new version elsewhere and adds an entry to both
    indexes, the (sandbox, run, activity, profile, entity) one being wide. SQLite has no such setting."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ALTER TABLE send_ledger SET (fillfactor = 50)"))


def _message_log_batches(conn: sa.Connection) -> None:
    """Move the queued logs of the per-message outbox into message log batches (one per sandbox,
    status, event time and attempt state) and drop the outbox."""
    batches: sa.Table = MessageLogBatchRow.__table__  # type: ignore[attr-defined]
    batches.create(conn, checkfirst=True)
    outbox: sa.Table = MessageLogOutboxRow.__table__  # type: ignore[attr-defined]
    if not sa.inspect(conn).has_table(outbox.name):
        return
    groups: dict[tuple[Any, ...], list[str]] = {}
    rows = conn.execute(sa.select(outbox).order_by(outbox.c.create_time, outbox.c.message_id)).mappings()
    for row in rows:
        key = (row["sandbox"], row["status"], row["event_time"], row["create_time"], row["attempts"])
        groups.setdefault((*key, row["next_attempt_time"]), []).append(row["message_id"])
    for (sandbox, status, event_time, create_time, attempts, next_attempt_time), ids in groups.items():
        conn.execute(
            batches.insert().values(
                sandbox=sandbox,
                status=status,
                event_time=event_time,
                message_ids=json.dumps(ids),
                size=len(ids),
                create_time=create_time,
                attempts=attempts,
                next_attempt_time=next_attempt_time,
            )
        )
    outbox.drop(conn)


MIGRATIONS = [
    Migration(1, "templates and the send ledger", _initial),
    Migration(2, "send windows, feedback and the feedback events", _feedback),
    Migration(3, "recipient identities in the ledger and the message log outbox", _message_logs),
    Migration(4, "one index on the ledger key", _one_ledger_key_index),
    Migration(5, "room in the ledger's pages for status updates", _room_for_status_updates),
    Migration(6, "message logs queued per batch", _message_log_batches),
]
