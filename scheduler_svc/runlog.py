"""The run log: what happened to a run, written in the same transaction as the change it describes.

Entries are appended by the run store (claimed, activity started / succeeded / failed, run ended),
by run creation (scheduled or signalled) and by the lifecycle (cancelled). They are read in order,
one page at a time (ListRunLogs), and followed live by WatchRun.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from carillon_chassis.database import as_utc, utcnow
from carillon_chassis.errors import InvalidArgument, NotFound
from carillon_chassis.pagination import decode_token, encode_token, page_size
from scheduler_svc.model import LogEntry, LogLevel, RunKey
from scheduler_svc.tables import RUN_LOGS, RUNS


def log_event(
    conn: sa.Connection,
    key: RunKey,
    message: str,
    *,
    activity: str = "",
    level: LogLevel = LogLevel.INFO,
    now: datetime | None = None,
) -> None:
    """Append one entry to a run's log, in the caller's transaction."""
    conn.execute(
        RUN_LOGS.insert().values(
            sandbox=key.sandbox,
            campaign_id=key.campaign_id,
            run_id=key.run_id,
            time=now or utcnow(),
            level=level.value,
            activity=activity,
            message=message,
        )
    )


def _where(key: RunKey) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        RUN_LOGS.c.sandbox == key.sandbox,
        RUN_LOGS.c.campaign_id == key.campaign_id,
        RUN_LOGS.c.run_id == key.run_id,
    )


def entries_after(conn: sa.Connection, key: RunKey, after: int, limit: int) -> list[LogEntry]:
    """Up to ``limit`` entries of a run after sequence ``after``, oldest first."""
    rows = conn.execute(
        sa.select(RUN_LOGS).where(*_where(key), RUN_LOGS.c.id > after).order_by(RUN_LOGS.c.id).limit(limit)
    ).mappings()
    return [
        LogEntry(
            sequence=r["id"],
            time=as_utc(r["time"]) or utcnow(),
            level=LogLevel(r["level"]),
            activity=r["activity"],
            message=r["message"],
        )
        for r in rows
    ]


def list_logs(conn: sa.Connection, key: RunKey, requested_size: int = 0, token: str = "") -> tuple[list[LogEntry], str]:
    """One page of a run's log, oldest first; NOT_FOUND (``parent``) for an unknown run."""
    size = page_size(requested_size)
    after = decode_token(token)
    if after is not None and not isinstance(after, int):
        raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token")
    exists = conn.execute(
        sa.select(RUNS.c.run_id).where(
            RUNS.c.sandbox == key.sandbox, RUNS.c.campaign_id == key.campaign_id, RUNS.c.run_id == key.run_id
        )
    ).first()
    if exists is None:
        raise NotFound(f"run {key.name!r} does not exist", field="parent", reason="RUN_NOT_FOUND")
    entries = entries_after(conn, key, after or 0, size + 1)
    page = entries[:size]
    return page, encode_token(page[-1].sequence) if len(entries) > size else ""
