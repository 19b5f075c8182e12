"""The send ledger: one row per message of a channel activity, the guarantee against lost and
duplicate sends.

A row is keyed by (sandbox, run, activity, profile key, entity key), unique in the database; its id
is the message id, derived from that key, so that every attempt at the same message (a replayed
batch, a resend after a crash) carries the same id, which is also the provider's idempotency key.
Statuses: ``pending`` (written before the provider is called), ``sent``, ``skipped``, ``failed`` (with a
reason) and ``deferred`` (outside the send window until ``defer_until``). Feedback events (delivered,
opened, ...) set the first time of each kind on a row, idempotent on the event id; the report of an
activity is one grouped query.

Message logs for audience_svc are queued as message log batches (one row per status and event time
of a change, holding the message ids) in the same transaction as the ledger change they report (a
``sent`` or ``failed`` status, a delivered / opened / clicked / bounced feedback event), so that none
is lost and none is queued for a change that was rolled back; the batches are emptied by
:mod:`delivery_svc.message_logs`. Plain synchronous SQLAlchemy; callers run it
on the database worker pool.

Batches are written in bulk: on PostgreSQL one ``INSERT … SELECT unnest(…)`` per batch for new rows and
one ``UPDATE … WHERE id = ANY(…)`` per status for the changes (an array of strings travels as one string
joined with U+001F, split by ``string_to_array`` in the server: binding thousands of parameters one by
one was most of a batch's ledger time); on SQLite, executemany and ``IN`` lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from carillon_chassis.bulk import pg_array, pg_rows
from carillon_chassis.database import Database, as_utc, utcnow
from delivery_svc.tables import FeedbackEventRow, LedgerRow, MessageLogBatchRow

PENDING = "pending"
SENT = "sent"
SKIPPED = "skipped"
FAILED = "failed"
DEFERRED = "deferred"
STATUSES = (PENDING, SENT, SKIPPED, FAILED, DEFERRED)
_CHUNK = 1000
# Keys per lookup query: a whole batch of the default maximum size (two bound values per key stay
# under the parameter limits of SQLite and PostgreSQL).
_FIND_CHUNK = 10000

LedgerKey = tuple[str, str]
"""(profile key, entity key): the part of a ledger key that varies within one activity."""


@dataclass(slots=True)
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
    defer_until: datetime | None = None
    identity_namespace: str = ""
    identity_value: str = ""

    @property
    def key(self) -> LedgerKey:
        """The (profile key, entity key) of the row."""
        return (self.profile_key, self.entity_key)


@dataclass(slots=True)  # not frozen: a frozen dataclass is four times slower to create (one per message)
class StatusChange:
    """A new status (and reason, and optionally address) for one existing row."""

    message_id: str
    status: str
    reason: str = ""
    address: str | None = None
    defer_until: datetime | None = None


@dataclass(slots=True)
class LoggedMessage:
    """What a message log says about its message (its ledger row's campaign, run, activity, channel,
    profile and entity keys, and the recipient's identity as the scheduler sent it)."""

    campaign: str
    run: str
    activity: str
    channel: str
    profile_key: str
    entity_key: str
    identity_namespace: str
    identity_value: str

    @classmethod
    def of(cls, row: LedgerEntry | sa.RowMapping) -> LoggedMessage:
        """The logged message of a ledger row (an entry, or a row with the ledger's column names)."""
        if isinstance(row, LedgerEntry):
            return cls(
                row.campaign,
                row.run,
                row.activity,
                row.channel,
                row.profile_key,
                row.entity_key,
                row.identity_namespace,
                row.identity_value,
            )
        return cls(*(row[name] for name in LOGGED_COLUMNS))


LOGGED_COLUMNS = (
    "campaign",
    "run",
    "activity",
    "channel",
    "profile_key",
    "entity_key",
    "identity_namespace",
    "identity_value",
)
"""The fields of :class:`LoggedMessage`, the ledger columns of the same names."""


@dataclass(slots=True)  # not frozen, as StatusChange
class LogEvent:
    """A message log event to queue for audience_svc: a message, what happened and when, and what the
    log says about the message (None: read from its ledger row when the log is sent)."""

    sandbox: str
    message_id: str
    status: str
    event_time: datetime
    about: LoggedMessage | None = None


@dataclass(slots=True)
class LogGroup:
    """Message log events of one status and event time for several messages of one sandbox (the sends of
    a batch), queued without an object per message. ``message_ids`` are distinct; ``about`` holds, per
    field of :class:`LoggedMessage`, the value the messages share or one value per message in id order
    (:func:`logged_column`); None: read from the ledger rows when the logs are sent."""

    sandbox: str
    status: str
    event_time: datetime
    message_ids: list[str]
    about: dict[str, str | list[str]] | None = None


def logged_column(values: list[str]) -> str | list[str]:
    """A field of a message log batch's ``details``: the value when every message has it, else the values."""
    first = values[0]
    return first if values.count(first) == len(values) else values


# Message log status of each feedback kind that has one (complaints and unsubscribes have none).
FEEDBACK_LOG_STATUS = {
    "delivered": "delivered",
    "opened": "opened",
    "clicked": "clicked",
    "soft_bounce": "bounced",
    "hard_bounce": "bounced",
}

# Feedback kinds and the ledger column each one stamps.
FEEDBACK_COLUMNS = {
    "delivered": "delivered_time",
    "opened": "open_time",
    "clicked": "click_time",
    "soft_bounce": "bounce_time",
    "hard_bounce": "bounce_time",
    "complaint": "complaint_time",
    "unsubscribe": "unsubscribe_time",
}


@dataclass(frozen=True)
class FeedbackEvent:
    """One feedback event about a sent message."""

    event_id: str
    message_id: str
    kind: str
    event_time: datetime
    detail: str = ""


@dataclass(frozen=True)
class FeedbackTarget:
    """What the profile service must learn from an event: the kind, the profile and the channel."""

    event_id: str
    kind: str
    message_id: str
    profile_key: str
    channel: str
    address: str
    event_time: datetime


@dataclass
class FeedbackOutcome:
    """The result of recording events: how many were new, how many repeats, and what to forward."""

    recorded: int = 0
    duplicates: int = 0
    to_forward: list[FeedbackTarget] = field(default_factory=list)


class UnknownMessages(LookupError):
    """Feedback named message ids that are not in the ledger (their positions in the request)."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__(f"{len(positions)} unknown message ids")
        self.positions = positions


@dataclass
class ActivityReport:
    """The counts of one run and activity."""

    targeted: int = 0
    sent: int = 0
    pending: int = 0
    deferred: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    opened: int = 0
    clicked: int = 0
    bounced: int = 0
    complained: int = 0
    unsubscribed: int = 0


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
        defer_until=as_utc(row["defer_until"]),
        identity_namespace=row["identity_namespace"],
        identity_value=row["identity_value"],
    )


def _chunks(items: Sequence[object], size: int = _CHUNK) -> Iterable[Sequence[object]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert_new(conn: sa.Connection, table: sa.Table, columns: dict[str, list[Any]], constants: dict[str, Any]) -> bool:
    """Insert rows given by ``columns`` (each column's values, one per row) plus the ``constants``
    columns, leaving out a row whose key exists: executemany per 1,000 rows on SQLite; on PostgreSQL one
    ``INSERT … SELECT unnest(…)`` (:func:`carillon_chassis.bulk.pg_rows`). True when every row was
    inserted by this call (False: some key was taken, which rows is not told).

    On PostgreSQL the rows are first inserted plainly, in a savepoint: the callers insert rows they
    just found missing, and the check of ``ON CONFLICT DO NOTHING`` cost as much again as the insert
    (a 5,000-row batch: 12 µs a row against 7). When a row's key was taken meanwhile (another writer),
    the savepoint is rolled back and the rows are inserted again with ``ON CONFLICT DO NOTHING``."""
    names = list(columns)
    count = len(columns[names[0]]) if names else 0
    if not count:
        return True
    if conn.dialect.name != "postgresql":
        statement = sqlite.insert(table).on_conflict_do_nothing()
        rows = [dict(zip(names, values, strict=True)) | constants for values in zip(*columns.values(), strict=True)]
        inserted = 0
        for start in range(0, count, _CHUNK):
            inserted += conn.execute(statement, rows[start : start + _CHUNK]).rowcount
        return inserted == count
    rows_select = pg_rows(table, columns).add_columns(
        *(sa.bindparam(None, value, type_=table.c[name].type) for name, value in constants.items())
    )
    insert = postgresql.insert(table).from_select(names + list(constants), rows_select)
    try:
        with conn.begin_nested():
            conn.execute(insert)
    except sa.exc.IntegrityError:
        conn.execute(insert.on_conflict_do_nothing())
        return False
    return True


def _durable_commits(conn: sa.Connection) -> bool:
    """Whether a commit on this connection survives a crash of the machine: PostgreSQL unless
    ``synchronous_commit`` is off; SQLite with ``synchronous`` FULL or EXTRA (the chassis sets NORMAL,
    under which a WAL commit can be lost). Read once per driver connection."""
    info = conn.connection.info
    durable = info.get("carillon_durable_commits")
    if durable is None:
        if conn.dialect.name == "postgresql":
            durable = conn.exec_driver_sql("SELECT current_setting('synchronous_commit')").scalar() != "off"
        else:
            durable = int(conn.exec_driver_sql("PRAGMA synchronous").scalar() or 0) >= 2
        info["carillon_durable_commits"] = durable
    return bool(durable)


def _details(about: Sequence[LoggedMessage | None]) -> str | None:
    """The ``details`` of a message log batch row (JSON): per field of :class:`LoggedMessage`, its value
    when all messages share it, else the list of values in message order; None when a message's
    details are not known."""
    known = [a for a in about if a is not None]
    if len(known) != len(about) or not known:
        return None
    return json.dumps({name: logged_column([getattr(a, name) for a in known]) for name in LOGGED_COLUMNS})


def logged_messages(details: str, count: int) -> list[LoggedMessage]:
    """The logged messages of a batch row's ``details`` (see :func:`_details`) for its ``count`` ids."""
    fields = json.loads(details)
    columns = [fields[name] if isinstance(fields[name], list) else [fields[name]] * count for name in LOGGED_COLUMNS]
    return [LoggedMessage(*values) for values in zip(*columns, strict=True)]


class Ledger:
    """The send ledger of one database."""

    def __init__(self, database: Database, *, message_logs: bool = False) -> None:
        """``message_logs``: whether log events are queued for audience_svc (ignored when off)."""
        self.database = database
        self.message_logs = message_logs
        self._table: sa.Table = LedgerRow.__table__  # type: ignore[attr-defined]
        self._log_batches: sa.Table = MessageLogBatchRow.__table__  # type: ignore[attr-defined]

    def find(self, sandbox: str, run: str, activity: str, keys: Iterable[LedgerKey]) -> dict[LedgerKey, LedgerEntry]:
        """The existing rows of ``keys`` in one run and activity (one query per 10,000 keys)."""
        t = self._table
        wanted = list(dict.fromkeys(keys))
        found: dict[LedgerKey, LedgerEntry] = {}
        with self.database.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            for start in range(0, len(wanted), _FIND_CHUNK):
                chunk = wanted[start : start + _FIND_CHUNK]
                if postgres:
                    # One index lookup per key, whatever the statistics say: a LATERAL subquery with
                    # LIMIT 1 (the key is unique) that the planner cannot flatten into a join. A plain
                    # join with unnest() was planned as a hash join over the activity's every row while
                    # the table's statistics lagged behind a fast-growing ledger (a send's own batches),
                    # so each batch cost more than the one before.
                    keys_table = (
                        sa.select(
                            sa.func.unnest(pg_array([k[0] for k in chunk], t.c.profile_key)).label("p"),
                            sa.func.unnest(pg_array([k[1] for k in chunk], t.c.entity_key)).label("e"),
                        )
                    ).subquery("k")
                    lookup = (
                        sa.select(t)
                        .where(
                            t.c.sandbox == sandbox,
                            t.c.run == run,
                            t.c.activity == activity,
                            t.c.profile_key == keys_table.c.p,
                            t.c.entity_key == keys_table.c.e,
                        )
                        .limit(1)
                        .lateral("l")
                    )
                    query = sa.select(lookup).select_from(keys_table).join(lookup, sa.true())
                else:
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

    def write(
        self, new: Sequence[LedgerEntry], changes: Sequence[StatusChange] = (), logs: Sequence[LogEvent] = ()
    ) -> bool:
        """Insert new rows, change existing ones and queue message logs in one transaction.

        A new row whose key (or id) is already taken is left as it is: the ids are derived from the
        keys, so the existing row is the same message. True when every new row was written by this
        call, durably (so that no earlier attempt of their messages exists: a commit that a crash of the
        machine can undo, as SQLite's ``synchronous=NORMAL`` or PostgreSQL's ``synchronous_commit=off``
        allow, could have made a message sent before look new); False when some key was taken or
        the commit is not durable.
        """
        now = utcnow()
        with self.database.engine.begin() as conn:
            all_new = _insert_new(
                conn,
                self._table,
                {
                    "id": [e.message_id for e in new],
                    "sandbox": [e.sandbox for e in new],
                    "campaign": [e.campaign for e in new],
                    "run": [e.run for e in new],
                    "activity": [e.activity for e in new],
                    "profile_key": [e.profile_key for e in new],
                    "entity_key": [e.entity_key for e in new],
                    "channel": [e.channel for e in new],
                    "status": [e.status for e in new],
                    "reason": [e.reason for e in new],
                    "address": [e.address for e in new],
                    "defer_until": [e.defer_until for e in new],
                    "identity_namespace": [e.identity_namespace for e in new],
                    "identity_value": [e.identity_value for e in new],
                },
                {"create_time": now, "update_time": now},
            )
            self._apply(conn, changes, now)
            self._queue_logs(conn, logs, now)
            return all_new and _durable_commits(conn)

    def mark(
        self, changes: Sequence[StatusChange], logs: Sequence[LogEvent | LogGroup] = (), *, sent: Sequence[str] = ()
    ) -> None:
        """Record the outcome of sends (``sent`` or ``failed`` with a reason) and queue their message
        logs in one transaction. ``sent``: ids marked sent as by a ``StatusChange(id, "sent")`` each (a
        batch's sends, without an object per message)."""
        now = utcnow()
        with self.database.engine.begin() as conn:
            self._apply(conn, changes, now, sent)
            self._queue_logs(conn, logs, now)

    def _queue_logs(self, conn: sa.Connection, logs: Sequence[LogEvent | LogGroup], now: datetime) -> None:
        """Queue log events for audience_svc: one message log batch row per sandbox, status and event
        time (a message named twice in it is queued once), holding the ids and, when every event of the
        row carries it, what the logs say about their messages (``details``: each field once when the
        same for all, else one value per message), so that sending them reads no ledger row. The same
        event queued by two changes (a replayed batch) reaches audience_svc twice, where
        RecordMessageLogs is idempotent. A :class:`LogGroup` is one row as it is."""
        if not self.message_logs or not logs:
            return
        groups: dict[tuple[str, str, datetime], dict[str, LoggedMessage | None]] = {}
        rows = []
        for e in logs:
            if isinstance(e, LogGroup):
                if e.message_ids:
                    details = json.dumps(e.about) if e.about is not None else None
                    rows.append(self._log_row(e.sandbox, e.status, e.event_time, e.message_ids, details, now))
                continue
            groups.setdefault((e.sandbox, e.status, e.event_time), {}).setdefault(e.message_id, e.about)
        rows += [
            self._log_row(sandbox, status, event_time, list(events), _details(list(events.values())), now)
            for (sandbox, status, event_time), events in groups.items()
        ]
        if rows:
            conn.execute(self._log_batches.insert(), rows)

    @staticmethod
    def _log_row(
        sandbox: str, status: str, event_time: datetime, message_ids: list[str], details: str | None, now: datetime
    ) -> dict[str, Any]:
        return {
            "sandbox": sandbox,
            "status": status,
            "event_time": event_time,
            "message_ids": json.dumps(message_ids),
            "details": details,
            "size": len(message_ids),
            "create_time": now,
            "attempts": 0,
            "next_attempt_time": now,
        }

    def _apply(
        self, conn: sa.Connection, changes: Sequence[StatusChange], now: datetime, sent: Sequence[str] = ()
    ) -> None:
        t = self._table
        groups: dict[tuple[str, str], list[str]] = {(SENT, ""): list(sent)} if sent else {}
        addresses: list[tuple[str, object]] = []
        deferrals: list[tuple[str, object]] = []
        for change in changes:
            groups.setdefault((change.status, change.reason), []).append(change.message_id)
            if change.address is not None:
                addresses.append((change.message_id, change.address))
            if change.status == DEFERRED:
                deferrals.append((change.message_id, change.defer_until))
        postgres = conn.dialect.name == "postgresql"
        updating = bool(changes or sent)
        if postgres and updating:
            # Every update below finds its rows by id. PostgreSQL's cost model (random page reads cost
            # 4x sequential ones) prefers scanning the whole ledger to a few thousand primary-key
            # lookups, so each batch of a send would cost more than the one before: not here.
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            conn.exec_driver_sql("SET LOCAL enable_hashjoin = off")
            conn.exec_driver_sql("SET LOCAL enable_mergejoin = off")
        for (status, reason), ids in groups.items():
            values: dict[str, object] = {"status": status, "reason": reason, "update_time": now}
            if status == SENT:
                values["sent_time"] = now
            if postgres:
                conn.execute(t.update().where(t.c.id == sa.any_(pg_array(ids, t.c.id))).values(**values))
                continue
            for chunk in _chunks(ids):
                conn.execute(t.update().where(t.c.id.in_(chunk)).values(**values))
        if deferrals:
            self._set_each(conn, t.c.defer_until, deferrals)
        if addresses:
            self._set_each(conn, t.c.address, addresses)
        if postgres and updating:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = on")
            conn.exec_driver_sql("SET LOCAL enable_hashjoin = on")
            conn.exec_driver_sql("SET LOCAL enable_mergejoin = on")

    def _set_each(self, conn: sa.Connection, column: sa.Column[Any], values: Sequence[tuple[str, object]]) -> None:
        """Set ``column`` of each row id to its own value: one ``UPDATE … FROM unnest(…)`` on PostgreSQL,
        an executemany on SQLite."""
        t = self._table
        if conn.dialect.name != "postgresql":
            conn.execute(
                t.update().where(t.c.id == sa.bindparam("b_id")).values({column: sa.bindparam("b_value")}),
                [{"b_id": row_id, "b_value": value} for row_id, value in values],
            )
            return
        pairs = sa.select(
            sa.func.unnest(pg_array([row_id for row_id, _ in values], t.c.id)).label("id"),
            sa.func.unnest(pg_array([value for _, value in values], column)).label("value"),
        ).subquery("v")
        conn.execute(t.update().where(t.c.id == pairs.c.id).values({column: pairs.c.value}))

    # -- feedback -------------------------------------------------------------------------------
    def record_feedback(self, sandbox: str, events: Sequence[FeedbackEvent]) -> FeedbackOutcome:
        """Record events in one transaction: each new event id stamps its message's row.

        Raises UnknownMessages (nothing written) when a message id is not in the sandbox's ledger.
        Events recorded earlier but never forwarded are returned for forwarding again.
        """
        t = self._table
        f: sa.Table = FeedbackEventRow.__table__  # type: ignore[attr-defined]
        now = utcnow()
        outcome = FeedbackOutcome()
        with self.database.engine.begin() as conn:
            ids = list({e.message_id for e in events})
            rows: dict[str, sa.RowMapping] = {}
            for chunk in _chunks(ids):
                query = sa.select(t.c.id, t.c.address, *(t.c[name] for name in LOGGED_COLUMNS)).where(
                    t.c.sandbox == sandbox, t.c.id.in_(chunk)
                )
                rows.update({r["id"]: r for r in conn.execute(query).mappings()})
            unknown = [i for i, e in enumerate(events) if e.message_id not in rows]
            if unknown:
                raise UnknownMessages(unknown)
            event_ids = list({e.event_id for e in events})
            known: dict[str, bool] = {}
            for chunk in _chunks(event_ids):
                query = sa.select(f.c.event_id, f.c.forwarded).where(f.c.sandbox == sandbox, f.c.event_id.in_(chunk))
                known.update({r.event_id: bool(r.forwarded) for r in conn.execute(query)})
            fresh: dict[str, FeedbackEvent] = {}
            for event in events:
                if event.event_id in known or event.event_id in fresh:
                    outcome.duplicates += 1
                    if known.get(event.event_id) is False:
                        known[event.event_id] = True  # forward once per call
                        outcome.to_forward.append(self._target(event, rows[event.message_id]))
                    continue
                fresh[event.event_id] = event
            if fresh:
                conn.execute(
                    f.insert(),
                    [
                        {
                            "sandbox": sandbox,
                            "event_id": e.event_id,
                            "message_id": e.message_id,
                            "kind": e.kind,
                            "event_time": e.event_time,
                            "detail": e.detail[:1000],
                            "forwarded": False,
                            "create_time": now,
                        }
                        for e in fresh.values()
                    ],
                )
            for event in fresh.values():
                column = t.c[FEEDBACK_COLUMNS[event.kind]]
                values: dict[str, object] = {column.name: sa.func.coalesce(column, event.event_time)}
                if event.kind == "hard_bounce":
                    values["bounce_kind"] = "hard"
                elif event.kind == "soft_bounce":
                    values["bounce_kind"] = sa.case((t.c.bounce_kind == "hard", "hard"), else_="soft")
                conn.execute(t.update().where(t.c.id == event.message_id).values(**values))
                outcome.to_forward.append(self._target(event, rows[event.message_id]))
            self._queue_logs(
                conn,
                [
                    LogEvent(
                        sandbox,
                        e.message_id,
                        FEEDBACK_LOG_STATUS[e.kind],
                        e.event_time,
                        LoggedMessage.of(rows[e.message_id]),
                    )
                    for e in fresh.values()
                    if e.kind in FEEDBACK_LOG_STATUS
                ],
                now,
            )
            outcome.recorded = len(fresh)
        return outcome

    @staticmethod
    def _target(event: FeedbackEvent, row: sa.RowMapping) -> FeedbackTarget:
        return FeedbackTarget(
            event_id=event.event_id,
            kind=event.kind,
            message_id=event.message_id,
            profile_key=row["profile_key"],
            channel=row["channel"],
            address=row["address"],
            event_time=event.event_time,
        )

    def mark_forwarded(self, sandbox: str, event_ids: Sequence[str]) -> None:
        """Note that these events reached the profile service."""
        f: sa.Table = FeedbackEventRow.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as conn:
            for chunk in _chunks(list(event_ids)):
                conn.execute(f.update().where(f.c.sandbox == sandbox, f.c.event_id.in_(chunk)).values(forwarded=True))

    # -- reports --------------------------------------------------------------------------------
    def report(self, sandbox: str, run: str, activity: str) -> ActivityReport:
        """The counts of one run and activity, from one query grouped by status and reason."""
        t = self._table
        query = (
            sa.select(
                t.c.status,
                t.c.reason,
                sa.func.count().label("n"),
                sa.func.count(t.c.delivered_time).label("delivered"),
                sa.func.count(t.c.open_time).label("opened"),
                sa.func.count(t.c.click_time).label("clicked"),
                sa.func.count(t.c.bounce_time).label("bounced"),
                sa.func.count(t.c.complaint_time).label("complained"),
                sa.func.count(t.c.unsubscribe_time).label("unsubscribed"),
            )
            .where(t.c.sandbox == sandbox, t.c.run == run, t.c.activity == activity)
            .group_by(t.c.status, t.c.reason)
        )
        report = ActivityReport()
        with self.database.engine.connect() as conn:
            for row in conn.execute(query):
                n = int(row.n)
                report.targeted += n
                if row.status == SENT:
                    report.sent += n
                elif row.status == PENDING:
                    report.pending += n
                elif row.status == DEFERRED:
                    report.deferred += n
                elif row.status == SKIPPED:
                    report.skipped[row.reason] = report.skipped.get(row.reason, 0) + n
                elif row.status == FAILED:
                    report.failed[row.reason] = report.failed.get(row.reason, 0) + n
                report.delivered += int(row.delivered)
                report.opened += int(row.opened)
                report.clicked += int(row.clicked)
                report.bounced += int(row.bounced)
                report.complained += int(row.complained)
                report.unsubscribed += int(row.unsubscribed)
        return report
