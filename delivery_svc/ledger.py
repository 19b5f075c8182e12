"""The send ledger: one row per message of a channel activity, the guarantee against lost and
duplicate sends.

A row is keyed by (sandbox, run, activity, profile key, entity key), unique in the database; its id
is the message id, derived from that key, so that every attempt at the same message (a replayed
batch, a resend after a crash) carries the same id, which is also the provider's idempotency key.
Statuses: ``pending`` (written before the provider is called), ``sent``, ``skipped`` and ``failed``
(with a reason). Plain synchronous SQLAlchemy; callers run it on the database worker pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from carillon_chassis.database import Database, as_utc, utcnow
from delivery_svc.tables import LedgerRow

PENDING = "pending"
SENT = "sent"
SKIPPED = "skipped"
FAILED = "failed"
STATUSES = (PENDING, SENT, SKIPPED, FAILED)
_CHUNK = 1000
# Keys per lookup query: a whole batch of the default maximum size (two bound values per key stay
# under the parameter limits of SQLite and PostgreSQL).
_FIND_CHUNK = 10000

LedgerKey = tuple[str, str]
"""(profile key, entity key): the part of a ledger key that varies within one activity."""


def profile_key(profile_id: str | None, namespace: str, value: str) -> str:
    """The ledger's profile key: the profile id, or ``namespace:value`` when no profile exists."""
    return profile_id if profile_id else f"{namespace}:{value}"


def message_id(sandbox: str, run: str, activity: str, profile: str, entity_key: str) -> str:
    """The message id of a ledger key: stable across attempts, unique per key."""
    raw = "\x1f".join((sandbox, run, activity, profile, entity_key)).encode()
    return "m" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass
class LedgerEntry:
    """One row of the ledger."""

    message_id: str
    sandbox: str
    campaign: str
    run: str
    activity: str
    profile_key: str
    entity_key: str
    channel: str
    status: str
    reason: str = ""
    address: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def key(self) -> LedgerKey:
        """The (profile key, entity key) of the row."""
        return (self.profile_key, self.entity_key)


@dataclass(frozen=True)
class StatusChange:
    """A new status (and reason, and optionally address) for one existing row."""

    message_id: str
    status: str
    reason: str = ""
    address: str | None = None


def _entry(row: sa.RowMapping) -> LedgerEntry:
    return LedgerEntry(
        message_id=row["id"],
        sandbox=row["sandbox"],
        campaign=row["campaign"],
        run=row["run"],
        activity=row["activity"],
        profile_key=row["profile_key"],
        entity_key=row["entity_key"],
        channel=row["channel"],
        status=row["status"],
        reason=row["reason"],
        address=row["address"],
        create_time=as_utc(row["create_time"]),
        update_time=as_utc(row["update_time"]),
    )


def _chunks(items: Sequence[object], size: int = _CHUNK) -> Iterable[Sequence[object]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Ledger:
    """The send ledger of one database."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._table: sa.Table = LedgerRow.__table__  # type: ignore[attr-defined]

    def find(self, sandbox: str, run: str, activity: str, keys: Iterable[LedgerKey]) -> dict[LedgerKey, LedgerEntry]:
        """The existing rows of ``keys`` in one run and activity (one query per 10,000 keys)."""
        t = self._table
        wanted = list(dict.fromkeys(keys))
        found: dict[LedgerKey, LedgerEntry] = {}
        with self.database.engine.connect() as conn:
            for chunk in _chunks(wanted, _FIND_CHUNK):
                query = sa.select(t).where(
                    t.c.sandbox == sandbox,
                    t.c.run == run,
                    t.c.activity == activity,
                    sa.tuple_(t.c.profile_key, t.c.entity_key).in_(chunk),
                )
                for row in conn.execute(query).mappings():
                    entry = _entry(row)
                    found[entry.key] = entry
        return found

    def entries(self, sandbox: str, run: str, activity: str) -> list[LedgerEntry]:
        """Every row of one run and activity, in key order (for inspection and tests)."""
        t = self._table
        query = (
            sa.select(t)
            .where(t.c.sandbox == sandbox, t.c.run == run, t.c.activity == activity)
            .order_by(t.c.profile_key, t.c.entity_key)
        )
        with self.database.engine.connect() as conn:
            return [_entry(row) for row in conn.execute(query).mappings()]

    def write(self, new: Sequence[LedgerEntry], changes: Sequence[StatusChange] = ()) -> None:
        """Insert new rows and change existing ones in one transaction.

        A new row whose key (or id) is already taken is left as it is: the ids are derived from the
        keys, so the existing row is the same message.
        """
        now = utcnow()
        with self.database.engine.begin() as conn:
            if new:
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                statement = dialect.insert(self._table).on_conflict_do_nothing()
                conn.execute(
                    statement,
                    [
                        {
                            "id": e.message_id,
                            "sandbox": e.sandbox,
                            "campaign": e.campaign,
                            "run": e.run,
                            "activity": e.activity,
                            "profile_key": e.profile_key,
                            "entity_key": e.entity_key,
                            "channel": e.channel,
                            "status": e.status,
                            "reason": e.reason,
                            "address": e.address,
                            "create_time": now,
                            "update_time": now,
                        }
                        for e in new
                    ],
                )
            self._apply(conn, changes, now)

    def mark(self, changes: Sequence[StatusChange]) -> None:
        """Record the outcome of sends (``sent`` or ``failed`` with a reason) in one transaction."""
        with self.database.engine.begin() as conn:
            self._apply(conn, changes, utcnow())

    def _apply(self, conn: sa.Connection, changes: Sequence[StatusChange], now: datetime) -> None:
        t = self._table
        groups: dict[tuple[str, str], list[str]] = {}
        addresses: list[dict[str, str]] = []
        for change in changes:
            groups.setdefault((change.status, change.reason), []).append(change.message_id)
            if change.address is not None:
                addresses.append({"b_id": change.message_id, "b_address": change.address})
        for (status, reason), ids in groups.items():
            for chunk in _chunks(ids):
                conn.execute(t.update().where(t.c.id.in_(chunk)).values(status=status, reason=reason, update_time=now))
        if addresses:
            conn.execute(
                t.update().where(t.c.id == sa.bindparam("b_id")).values(address=sa.bindparam("b_address")),
                addresses,
            )
