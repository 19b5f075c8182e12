"""Database engines, sessions and migrations for one service.

A service owns one database: a SQLite file under the data directory by default, or a PostgreSQL
schema (``carillon_<service>``) when a ``postgresql+psycopg://`` URL is configured. Domain code is
plain synchronous SQLAlchemy; the async servers call it through :meth:`Database.run`, which runs it
on the service's bounded worker-thread pool so the event loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from carillon_chassis.errors import Aborted, CarillonError, Unavailable

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    """One schema change: a version number, a name and the function that applies it."""

    version: int
    name: str
    apply: Callable[[Connection], None]


_migrations_table = sa.Table(
    "carillon_schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


# SQLSTATEs of a PostgreSQL transaction that lost to a concurrent one, and of a server that cannot
# take the call now.
_CONFLICT_STATES = {"40001": "SERIALIZATION_FAILURE", "40P01": "DEADLOCK", "55P03": "LOCK_NOT_AVAILABLE"}
_UNAVAILABLE_STATE_PREFIXES = ("08", "57P", "53300")


def retryable_error(exc: BaseException) -> CarillonError | None:
    """The status of a database error that no caller handled and that retrying may cure, or None.

    A transaction aborted by a concurrent one (serialization failure, deadlock, lock timeout) is
    ABORTED; a database that is busy (SQLite's writer lock held past the busy timeout) or cannot be
    reached is UNAVAILABLE. Anything else stays a bug (INTERNAL)."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    state = getattr(exc.orig, "sqlstate", None)
    if isinstance(state, str) and state in _CONFLICT_STATES:
        return Aborted(
            "the database aborted the transaction: it conflicted with a concurrent one; retry",
            reason=_CONFLICT_STATES[state],
        )
    if (isinstance(state, str) and state.startswith(_UNAVAILABLE_STATE_PREFIXES)) or exc.connection_invalidated:
        return Unavailable("the database cannot be reached; retry", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, sa.exc.OperationalError) and "database is locked" in str(exc.orig):
        return Unavailable("the database is busy; retry", reason="DATABASE_BUSY")
    return None


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Attach UTC to a naive datetime read back from SQLite; keep aware ones as they are."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Database:
    """One service's engine, its worker-thread pool and its migrations."""

    def __init__(self, url: str, *, schema: str | None = None, threads: int = 8, jit: bool = True) -> None:
        """``jit``: whether PostgreSQL may JIT-compile this service's statements (see ``open_database``)."""
        self.url = sa.make_url(url)
        self.schema = schema
        self.threads = threads
        self.jit = jit
        self.engine: Engine = self._create_engine()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="db")

    @property
    def is_postgres(self) -> bool:
        """True on PostgreSQL, False on SQLite."""
        return self.engine.dialect.name == "postgresql"

    def _create_engine(self) -> Engine:
        if self.url.get_backend_name() == "sqlite":
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                self.url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=self.threads + 2,
            )

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()

            return engine
        if self.url.get_backend_name() != "postgresql":
            raise ValueError(f"unsupported database URL {self.url!r}: use sqlite:/// or postgresql+psycopg://")
        if self.schema is None or not _SCHEMA_PATTERN.match(self.schema):
            raise ValueError(f"invalid PostgreSQL schema name {self.schema!r}")
        bootstrap = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        with bootstrap.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
        bootstrap.dispose()
        return sa.create_engine(
            self.url,
            # Custom plans always: a prepared statement's generic plan ignores the sizes of IN lists and arrays.
            connect_args={
                "options": f"-csearch_path={self.schema} -cplan_cache_mode=force_custom_plan"
                + ("" if self.jit else " -cjit=off")
            },
            pool_size=self.threads + 2,
            pool_pre_ping=True,
        )

    def migrate(self, migrations: Sequence[Migration]) -> list[int]:
        """Apply the migrations not applied yet, in version order; return the versions applied."""
        applied: list[int] = []
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(current_schema()))"))
            _migrations_table.create(conn, checkfirst=True)
            done = set(conn.execute(sa.select(_migrations_table.c.version)).scalars())
            for migration in sorted(migrations, key=lambda m: m.version):
                if migration.version in done:
                    continue
                migration.apply(conn)
                conn.execute(
                    _migrations_table.insert().values(
                        version=migration.version, name=migration.name, applied_at=utcnow()
                    )
                )
                applied.append(migration.version)
        return applied

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking database work on the worker pool, keeping the caller's context variables."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop the worker pool and close every pooled connection."""
        self._executor.shutdown(wait=True)
        self.engine.dispose()
