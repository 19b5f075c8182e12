"""Message logs: recording the events of sent messages in the built-in entity ``message_logs``.

Delivery reports what happened to each message (sent, delivered, opened, clicked, bounced, failed)
as :class:`MessageLog` events. A call is checked as a whole first: every problem of every log is a
field violation (``logs[3].status``) and nothing is written when there is one. Then the events are
inserted in one transaction with ``INSERT … ON CONFLICT (message_id, status) DO NOTHING RETURNING``
(on PostgreSQL one ``INSERT … SELECT unnest(…)`` per call, each column one parameter), in
(message_id, status) order so that concurrent calls with overlapping events never deadlock, so
recording is idempotent: an event already stored, or repeated within the call, is counted as a
duplicate and the stored row is left unchanged. The
version of a log is its event time in microseconds since the epoch.

Rules reach the logs through the built-in link ``message_logs`` of every entity with an identity
binding (see :mod:`audience_svc.schema`), and ``message_logs`` is a query dimension of its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

from audience_svc.entities import EntityCatalog
from audience_svc.schema import MESSAGE_CHANNELS, MESSAGE_STATUSES
from audience_svc.violations import invalid_argument
from carillon_chassis.bulk import pg_rows
from carillon_chassis.database import as_utc, utcnow
from carillon_chassis.errors import FieldViolation
from carillon_chassis.names import ID_PATTERN

MAX_LOGS = 5000
# Longest accepted text of a message id, activity, identity or profile id.
MAX_TEXT = 500
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class MessageLog:
    """One event of one message; ``status`` and ``channel`` are lower-case names ("" when unset).

    ``event_time`` None means now (when the call records it).
    """

    message_id: str
    status: str
    campaign: str
    run: str
    activity: str
    channel: str
    identity_namespace: str
    identity_value: str
    profile_id: str = ""
    entity_key: str = ""
    event_time: dt.datetime | None = None


@dataclass(frozen=True)
class RecordResult:
    """How many events a call stored, and how many were already stored (or repeated in the call)."""

    recorded: int
    duplicates: int


def log_violations(logs: Sequence[MessageLog], path: str = "logs") -> list[FieldViolation]:
    """Every problem of every log, each naming its field (``logs[3].status``)."""
    found: list[FieldViolation] = []
    if len(logs) > MAX_LOGS:
        found.append(FieldViolation(path, f"at most {MAX_LOGS} logs per call; got {len(logs)}"))
        return found
    for i, log in enumerate(logs):
        at = f"{path}[{i}]"
        for name, value in (
            ("message_id", log.message_id),
            ("activity", log.activity),
            ("identity.namespace", log.identity_namespace),
            ("identity.value", log.identity_value),
        ):
            if not value:
                found.append(FieldViolation(f"{at}.{name}", f"{name} must be set"))
            elif len(value) > MAX_TEXT or "\x00" in value:
                found.append(FieldViolation(f"{at}.{name}", f"{name} has at most {MAX_TEXT} characters, no NUL"))
        for name, value in (("profile_id", log.profile_id), ("entity_key", log.entity_key)):
            if len(value) > MAX_TEXT or "\x00" in value:
                found.append(FieldViolation(f"{at}.{name}", f"{name} has at most {MAX_TEXT} characters, no NUL"))
        if log.status not in MESSAGE_STATUSES:
            problem = "must be set" if not log.status else f"{log.status!r} is unknown"
            found.append(FieldViolation(f"{at}.status", f"the status {problem}; one of {', '.join(MESSAGE_STATUSES)}"))
        if log.channel not in MESSAGE_CHANNELS:
            problem = "must be set" if not log.channel else f"{log.channel!r} is unknown"
            found.append(
                FieldViolation(f"{at}.channel", f"the channel {problem}; one of {', '.join(MESSAGE_CHANNELS)}")
            )
        campaign_ok = _is_name(log.campaign, "campaigns")
        if not campaign_ok:
            found.append(FieldViolation(f"{at}.campaign", "the campaign must look like campaigns/{campaign}"))
        if not _is_name(log.run, "campaigns", "runs"):
            found.append(FieldViolation(f"{at}.run", "the run must look like campaigns/{campaign}/runs/{run}"))
        elif campaign_ok and not log.run.startswith(f"{log.campaign}/"):
            found.append(FieldViolation(f"{at}.run", f"the run {log.run!r} is not a run of {log.campaign!r}"))
    return found


def _is_name(name: str, *collections: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2 * len(collections)
        and all(parts[2 * i] == c for i, c in enumerate(collections))
        and all(ID_PATTERN.match(value) for value in parts[1::2])
    )


def _row(log: MessageLog, now: dt.datetime) -> dict[str, Any]:
    event_time = as_utc(log.event_time) or now
    delta = event_time - _EPOCH
    return {
        "message_id": log.message_id,
        "status": log.status,
        "campaign": log.campaign,
        "run": log.run,
        "activity": log.activity,
        "channel": log.channel,
        "identity_namespace": log.identity_namespace,
        "identity_value": log.identity_value,
        "profile_id": log.profile_id or None,
        "entity_key": log.entity_key or None,
        "event_time": event_time,
        "version": (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds,
    }


class MessageLogRecorder:
    """Writes message logs to the built-in entity of each sandbox."""

    def __init__(self, catalog: EntityCatalog) -> None:
        self.catalog = catalog
        self.database = catalog.database

    def record(self, sandbox: str, logs: Sequence[MessageLog]) -> RecordResult:
        """Check every log, then insert them idempotently on (message_id, status) in one transaction."""
        violations = log_violations(logs)
        if violations:
            raise invalid_argument(
                f"{len(violations)} problem(s) in the message logs; nothing was recorded",
                violations,
                "INVALID_MESSAGE_LOGS",
            )
        if not logs:
            return RecordResult(recorded=0, duplicates=0)
        entity = self.catalog.message_logs(sandbox)
        now = utcnow()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for log in logs:
            rows.setdefault((log.message_id, log.status), _row(log, now))
        table = entity.table
        # Sorted by (message_id, status): concurrent calls lock the same keys in the same order, so
        # overlapping calls wait for each other instead of deadlocking (PostgreSQL).
        ordered = [rows[key] for key in sorted(rows)]
        with self.database.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # One INSERT … SELECT unnest(…) (rows in order), each column one parameter: the
                # executemany of a multi-row VALUES list bound every value on its own.
                columns = {name: [row[name] for row in ordered] for name in ordered[0]}
                statement = (
                    postgresql.insert(table)
                    .from_select(list(columns), pg_rows(table, columns))
                    .on_conflict_do_nothing(index_elements=[table.c.message_id, table.c.status])
                    .returning(table.c.message_id)
                )
                recorded = len(conn.execute(statement).all())
            else:
                statement = (
                    sqlite.insert(table)
                    .on_conflict_do_nothing(index_elements=[table.c.message_id, table.c.status])
                    .returning(table.c.message_id)
                )
                recorded = len(conn.execute(statement, ordered).all())
        return RecordResult(recorded=recorded, duplicates=len(logs) - recorded)
