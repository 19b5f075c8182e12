"""Saved audiences (the audience portal): definitions evaluated when read, or snapshots of members.

* A **definition** stores a query (see :mod:`audience_svc.definitions`); it is checked when saved
  (parameters may stay unbound: they are bound when the audience is evaluated or built).
* A **snapshot** stores the primary keys of a working set's members in its own table
  (``aud_<hex>``: one column per key attribute). Saving a working set under an id **creates or
  overwrites** the audience: the new members replace the old ones (never appended), in one
  transaction that also drops the previous snapshot table. A working set purged during the save is
  NOT_FOUND (field ``working_set``) and changes nothing.

Writes of one audience id (save, delete) are serialized: each runs in a transaction that first takes
the audience's lock (a transaction-level advisory lock on a hash of the sandbox and id on
PostgreSQL; the database's single write lock, taken by ``BEGIN IMMEDIATE``, on SQLite) and only then
reads the current catalog row. Two saves of one id at once (parallel branches of a run, or a
retried call racing the first) therefore both succeed, one after the other: the last one wins, the
audience holds exactly its members (never a mix or a union), only the first reports it created the
audience, each returns the audience as its own transaction left it, and no replaced snapshot table
is left behind. A delete racing a save either deletes the
saved audience or finds none (NOT_FOUND).

Ids are unique per sandbox. Either kind resolves to the dimension and one WHERE expression
(:meth:`SavedAudienceStore.resolve`), so evaluation, distribution and working-set builds treat a
saved audience exactly like an ad-hoc query. A snapshot's expression names its member table, which
a concurrent save of the same id replaces (and drops): readers go through
:meth:`SavedAudienceStore.read`, which resolves the audience again and repeats the read when its
statement failed because the table it named was replaced meanwhile (after waiting for the saves
in progress: a shared advisory lock on PostgreSQL, the write lock on SQLite), so a read racing an
overwrite sees either the old or the new members, never an error. A read that keeps losing that race
(:data:`MAX_READ_ATTEMPTS` times) is ABORTED (reason ``AUDIENCE_CHANGED``, retryable); an audience
deleted meanwhile is NOT_FOUND.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
import structlog

from audience_svc.audiences import resolve_query
from audience_svc.definitions import query_from_json, query_to_json
from audience_svc.entities import EntityCatalog
from audience_svc.query import AudienceQuery, Bindings, FilterLimits
from audience_svc.schema import Entity, column_type
from audience_svc.tables import SavedAudienceRow
from audience_svc.working_sets import WorkingSetStore, working_set_table
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import Aborted, AlreadyExists, InvalidArgument, NotFound
from carillon_chassis.names import validate_id
from carillon_chassis.pagination import keyset_page

log = structlog.get_logger("carillon.audience.saved_audiences")

_saved: sa.Table = SavedAudienceRow.__table__  # type: ignore[attr-defined]
DEFINITION = "definition"
SNAPSHOT = "snapshot"
MAX_DISPLAY_NAME = 200
# How many times a read of a saved audience is resolved again after a concurrent save replaced its members.
MAX_READ_ATTEMPTS = 5

T = TypeVar("T")
# A saved audience resolved: its dimension and the WHERE expression of its members.
Resolved = tuple[Entity, sa.ColumnElement[bool]]


class AudienceChanged(Aborted):
    """A read of a saved audience kept racing saves that replaced its members; retrying may succeed."""

    default_reason = "AUDIENCE_CHANGED"


@dataclass(frozen=True)
class SavedAudience:
    """A saved audience as the domain sees it (``query`` only for a definition)."""

    sandbox: str
    audience_id: str
    display_name: str
    entity_id: str
    kind: str
    query: AudienceQuery | None
    member_count: int
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        """The resource name, ``audiences/{audience}``."""
        return f"audiences/{self.audience_id}"


def snapshot_table(table_name: str, entity: Entity) -> sa.Table:
    """The Core table of a snapshot of ``entity``: one column per key attribute, the key itself."""
    columns = [
        sa.Column(f"k{i}", column_type(a.type), nullable=False)
        for i, a in enumerate(entity.schema.key_attributes, start=1)
    ]
    return sa.Table(table_name, sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*[c.name for c in columns]))


@contextlib.contextmanager
def _audience_lock(
    database: Database, sandbox: str, audience_id: str, *, shared: bool = False
) -> Iterator[sa.Connection]:
    """A transaction holding the lock of one audience id until it ends, taken before any read.

    PostgreSQL: a transaction-level advisory lock on a 64-bit hash of the sandbox and id (it also
    covers an id that has no row yet, which ``SELECT … FOR UPDATE`` could not lock); ``shared``
    takes it in shared mode, which waits for the writers holding or queued for it. SQLite:
    ``BEGIN IMMEDIATE`` takes the database's write lock (waiting up to the busy timeout) before the
    first read, so what the transaction reads is the latest committed state.
    """
    with database.engine.connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            digest = hashlib.blake2b(f"saved_audience\x00{sandbox}\x00{audience_id}".encode(), digest_size=8)
            key = int.from_bytes(digest.digest(), "big", signed=True)
            function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            conn.execute(sa.text(f"SELECT {function}(:key)"), {"key": key})
        else:
            # pysqlite would begin a deferred transaction only at the first write.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def _check_display_name(display_name: str) -> None:
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            f"display names have at most {MAX_DISPLAY_NAME} characters", field="audience.display_name"
        )


class SavedAudienceStore:
    """The saved audiences of one database."""

    def __init__(
        self, catalog: EntityCatalog, working_sets: WorkingSetStore, *, limits: FilterLimits | None = None
    ) -> None:
        self.catalog = catalog
        self.working_sets = working_sets
        self.database = catalog.database
        self.limits = limits or FilterLimits()

    def create_definition(
        self, sandbox: str, audience_id: str, display_name: str, query: AudienceQuery
    ) -> SavedAudience:
        """Save ``query`` as the definition ``audience_id``; AlreadyExists when the id is taken."""
        validate_id(audience_id, "audience_id")
        _check_display_name(display_name)
        resolve_query(
            self.catalog, sandbox, query, self.limits, path="audience.query", bindings=Bindings(allow_unbound=True)
        )
        now = utcnow()
        try:
            with self.database.engine.begin() as conn:
                conn.execute(
                    _saved.insert().values(
                        sandbox=sandbox,
                        audience_id=audience_id,
                        display_name=display_name,
                        entity_id=query.dimension,
                        kind=DEFINITION,
                        definition=query_to_json(query),
                        table_name="",
                        member_count=0,
                        create_time=now,
                        update_time=now,
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise AlreadyExists(
                f"audience {audience_id!r} already exists", field="audience_id", reason="AUDIENCE_ALREADY_EXISTS"
            ) from exc
        return self.get(sandbox, audience_id)

    def save_working_set(
        self, sandbox: str, audience_id: str, working_set_id: str, display_name: str = ""
    ) -> tuple[SavedAudience, bool]:
        """Save a working set's members as the snapshot ``audience_id``, creating or overwriting it.

        Returns the audience and whether it was created (False: an existing audience was replaced).
        """
        validate_id(audience_id, "audience_id")
        _check_display_name(display_name)
        working_set = self.working_sets.get(sandbox, working_set_id, field="working_set")
        entity = self.catalog.get_entity(sandbox, working_set.entity_id, field="working_set")
        source = working_set_table(self.working_sets.table_name(sandbox, working_set_id), entity)
        keys = [f"k{i}" for i in range(1, len(entity.schema.primary_key) + 1)]
        table = snapshot_table(f"aud_{uuid.uuid4().hex}", entity)
        now = utcnow()
        with (
            self.working_sets.reading(sandbox, {"working_set": working_set_id}),
            _audience_lock(self.database, sandbox, audience_id) as conn,
        ):
            # Old table, new table, members and catalog row change together, under the audience's lock.
            previous = conn.execute(
                sa.select(_saved.c.table_name, _saved.c.create_time).where(
                    _saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id
                )
            ).first()
            conn.execute(_saved.delete().where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
            conn.execute(
                _saved.insert().values(
                    sandbox=sandbox,
                    audience_id=audience_id,
                    display_name=display_name,
                    entity_id=entity.entity_id,
                    kind=SNAPSHOT,
                    definition="",
                    table_name=table.name,
                    member_count=0,
                    create_time=now if previous is None else previous.create_time,
                    update_time=now,
                )
            )
            if previous is not None and previous.table_name:
                conn.execute(sa.schema.DropTable(sa.Table(previous.table_name, sa.MetaData()), if_exists=True))
            table.create(conn)
            copied = conn.execution_options(preserve_rowcount=True).execute(
                table.insert().from_select(keys, sa.select(*[source.c[k] for k in keys]))
            )
            conn.execute(
                _saved.update()
                .where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id)
                .values(member_count=copied.rowcount)
            )
            # Read back in the transaction: a later save or a delete may follow as soon as it commits.
            saved = (
                conn.execute(sa.select(_saved).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
                .mappings()
                .one()
            )
        return _audience_of(saved), previous is None

    def get(self, sandbox: str, audience_id: str, *, field: str = "name") -> SavedAudience:
        """One saved audience; NotFound naming ``field`` when there is none."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(sa.select(_saved).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"audience {audience_id!r} does not exist", field=field, reason="AUDIENCE_NOT_FOUND")
        return _audience_of(row)

    def list(self, sandbox: str, size: int = 0, token: str = "") -> tuple[list[SavedAudience], str]:
        """One page of saved audiences in id order, and the next page's token ("" on the last page)."""
        with self.database.engine.connect() as conn:
            rows, next_token = keyset_page(
                conn, _saved, _saved.c.audience_id, [_saved.c.sandbox == sandbox], size, token
            )
        return [_audience_of(row) for row in rows], next_token

    def delete(self, sandbox: str, audience_id: str) -> None:
        """Delete a saved audience (and a snapshot's member table); NotFound when there is none."""
        with _audience_lock(self.database, sandbox, audience_id) as conn:
            row = conn.execute(
                sa.select(_saved.c.table_name).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id)
            ).first()
            if row is None:
                raise NotFound(f"audience {audience_id!r} does not exist", field="name", reason="AUDIENCE_NOT_FOUND")
            conn.execute(_saved.delete().where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
            if row.table_name:
                conn.execute(sa.schema.DropTable(sa.Table(row.table_name, sa.MetaData()), if_exists=True))

    def resolve(
        self, sandbox: str, audience_id: str, bindings: Bindings | None = None, *, field: str = "audience"
    ) -> Resolved:
        """The dimension of a saved audience and the WHERE expression of its members.

        A snapshot's expression names its member table, which a concurrent save may drop: run the
        statements that use it through :meth:`read`.
        """
        return self._resolve(sandbox, self._catalog_row(sandbox, audience_id, field), bindings, field)

    def read(
        self,
        sandbox: str,
        audience_id: str,
        use: Callable[[Resolved], T],
        bindings: Bindings | None = None,
        *,
        field: str = "audience",
    ) -> T:
        """``use`` called with the audience's dimension and WHERE expression (see :meth:`resolve`).

        When ``use`` fails with a database error after a concurrent save replaced the snapshot's
        member table (or a delete removed the audience), the audience is resolved again once the
        saves in progress (or queued) have committed, and ``use`` called again, up to
        :data:`MAX_READ_ATTEMPTS` times; ``use`` must leave nothing behind when it fails (one
        transaction). Any other failure is raised as it is.
        """
        for attempt in range(MAX_READ_ATTEMPTS):
            if attempt:
                # Let the saves in progress (or queued) finish first: the next resolution is their result.
                with _audience_lock(self.database, sandbox, audience_id, shared=True):
                    pass
            row = self._catalog_row(sandbox, audience_id, field)
            try:
                return use(self._resolve(sandbox, row, bindings, field))
            except sa.exc.DBAPIError:
                # NotFound when the audience was deleted meanwhile.
                now = self._catalog_row(sandbox, audience_id, field)
                if now["table_name"] == row["table_name"]:
                    raise
                log.info("saved audience replaced while read, reading again", audience=audience_id)
        raise AudienceChanged(
            f"audience {audience_id!r} was overwritten during each of {MAX_READ_ATTEMPTS} attempts to read it",
            metadata={"audience": audience_id},
        )

    def _catalog_row(self, sandbox: str, audience_id: str, field: str) -> sa.RowMapping:
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(sa.select(_saved).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"audience {audience_id!r} does not exist", field=field, reason="AUDIENCE_NOT_FOUND")
        return row

    def _resolve(self, sandbox: str, row: sa.RowMapping, bindings: Bindings | None, field: str) -> Resolved:
        if row["kind"] == DEFINITION:
            query = query_from_json(row["definition"])
            return resolve_query(self.catalog, sandbox, query, self.limits, path=field, bindings=bindings)
        entity = self.catalog.get_entity(sandbox, row["entity_id"], field=field)
        members = snapshot_table(row["table_name"], entity).alias()
        keys = entity.key_columns()
        found = (
            sa.select(sa.literal(1))
            .select_from(members)
            .where(*[members.c[f"k{i}"] == column for i, column in enumerate(keys, start=1)])
            .correlate_except(members)
            .exists()
        )
        return entity, found


def _audience_of(row: sa.RowMapping) -> SavedAudience:
    create_time = as_utc(row["create_time"])
    update_time = as_utc(row["update_time"])
    assert create_time is not None and update_time is not None
    return SavedAudience(
        sandbox=row["sandbox"],
        audience_id=row["audience_id"],
        display_name=row["display_name"],
        entity_id=row["entity_id"],
        kind=row["kind"],
        query=query_from_json(row["definition"]) if row["kind"] == DEFINITION else None,
        member_count=int(row["member_count"]),
        create_time=create_time,
        update_time=update_time,
    )
