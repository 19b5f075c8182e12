"""Quarantine of addresses from delivery feedback.

A hard bounce quarantines an address at once; soft bounces quarantine it after ``soft_bounce_limit`` in
a row; a delivery clears the soft count (it does not lift a quarantine: only a release does).
Complaints and unsubscribes opt the profile out of the channel; they do not quarantine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from carillon_chassis.database import as_utc
from profile_stub.keysets import KeyMatch, key_chunks, per_key
from profile_stub.tables import QuarantineRow

EVENT_KINDS = ("delivered", "soft_bounce", "hard_bounce", "complaint", "unsubscribe")
# The events that opt the profile out of the channel.
OPT_OUT_KINDS = ("complaint", "unsubscribe")


@dataclass
class DeliveryEvent:
    """One piece of delivery feedback for an address (and, when known, its profile)."""

    event_id: str
    channel: str
    kind: str
    address: str = ""
    profile_id: str = ""
    source: str = ""
    event_time: datetime | None = None


@dataclass
class Quarantine:
    """The bounce state of one address on one channel."""

    channel: str
    address: str
    quarantined: bool = False
    soft_bounces: int = 0
    reason: str = ""
    quarantine_time: datetime | None = None
    update_time: datetime | None = None


def _table() -> sa.Table:
    return QuarantineRow.__table__  # type: ignore[attr-defined,no-any-return]


def load(
    conn: sa.Connection, sandbox: str, channel: str, addresses: Iterable[str], *, lock: bool = False
) -> dict[str, Quarantine]:
    """The recorded state of each address that has one. With ``lock`` (PostgreSQL), each row is locked
    as it is read, in address order, until commit: callers that read a state, apply events to it and
    write it back serialize on the address instead of overwriting each other's result."""
    table = _table()
    wanted = sorted(set(addresses)) if lock else list(dict.fromkeys(addresses))
    found: dict[str, Quarantine] = {}
    postgres = conn.dialect.name == "postgresql"

    def query(match: KeyMatch) -> sa.Select[Any]:
        select = sa.select(table).where(table.c.sandbox == sandbox, table.c.channel == channel, match(table.c.address))
        return select.with_for_update() if lock and postgres else select

    for chunk in key_chunks(wanted, postgres):
        statement = per_key(conn, chunk, query, unique=True)  # one primary-key probe per address
        for r in conn.execute(statement).mappings():
            found[r["address"]] = Quarantine(
                channel=r["channel"],
                address=r["address"],
                quarantined=bool(r["quarantined"]),
                soft_bounces=int(r["soft_bounces"]),
                reason=r["reason"],
                quarantine_time=as_utc(r["quarantine_time"]),
                update_time=as_utc(r["update_time"]),
            )
    return found


def apply(state: Quarantine, kind: str, soft_bounce_limit: int, now: datetime) -> Quarantine:
    """The state after one event (pure)."""
    state.update_time = now
    if kind == "delivered":
        state.soft_bounces = 0
    elif kind == "soft_bounce":
        state.soft_bounces += 1
        if not state.quarantined and state.soft_bounces >= soft_bounce_limit:
            state.quarantined, state.reason, state.quarantine_time = True, "soft_bounce", now
    elif kind == "hard_bounce" and not state.quarantined:
        state.quarantined, state.reason, state.quarantine_time = True, "hard_bounce", now
    return state


def save(conn: sa.Connection, sandbox: str, states: Sequence[Quarantine], existing: set[tuple[str, str]]) -> None:
    """Write states (one per channel and address); ``existing`` names the (channel, address) pairs that
    have a row already (read, and on PostgreSQL locked, by :func:`load`). The others are inserted: when
    another call inserted the same address meanwhile, the insert fails (the call is then retried and
    reads that state) rather than overwrite it. One statement for the inserts, one for the updates."""
    table = _table()
    rows = [
        {
            "sandbox": sandbox,
            "channel": s.channel,
            "address": s.address,
            "soft_bounces": s.soft_bounces,
            "quarantined": s.quarantined,
            "reason": s.reason,
            "quarantine_time": s.quarantine_time,
            "update_time": s.update_time,
        }
        for s in states
    ]
    new: list[dict[str, Any]] = []
    old: list[dict[str, Any]] = []
    for row in rows:
        if (row["channel"], row["address"]) in existing:
            old.append({f"b_{name}": value for name, value in row.items()})
        else:
            new.append(row)
    if new:
        conn.execute(table.insert(), new)
    if old:
        keys = ("sandbox", "channel", "address")
        conn.execute(
            table.update()
            .where(*(table.c[name] == sa.bindparam(f"b_{name}") for name in keys))
            .values({name: sa.bindparam(f"b_{name}") for name in rows[0] if name not in keys}),
            old,
        )
