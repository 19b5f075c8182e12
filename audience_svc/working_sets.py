"""Working sets: the population of one run's targeting activity, materialized as a table.

Building one creates ``ws_<random hex>`` with a ``position`` column (1, 2, … in primary-key order)
and one column per primary-key attribute of the dimension (``k1``, ``k2``, … so that no attribute
name can collide with ``position``), filled by a single ``INSERT INTO ws SELECT row_number() OVER
(ORDER BY key), key FROM entity WHERE <filter>`` statement, plus a catalog row. A run's activity has
at most one working set: building it again returns the existing one unchanged.

Rows are read back with keyset pagination: one ``… JOIN entity ON key WHERE position > :after ORDER
BY position LIMIT :n`` per batch, so memory is bounded by the batch size. A record deleted from the
entity after the build is skipped (its position is simply absent). Working sets expire after the
retention period; :meth:`WorkingSetStore.purge_expired` drops their tables and catalog rows.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from audience_svc.audiences import resolve_query
from audience_svc.coercion import canonical_text, from_database, stored_key_text
from audience_svc.entities import EntityCatalog
from audience_svc.query import AudienceQuery, FilterLimits
from audience_svc.schema import Entity, column_type
from audience_svc.tables import WorkingSetRow
from audience_svc.violations import invalid_argument
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import FieldViolation, InvalidArgument, NotFound
from carillon_chassis.names import new_id, parse_name, validate_id
from carillon_chassis.values import PyValue

log = structlog.get_logger("carillon.audience.working_sets")

_catalog: sa.Table = WorkingSetRow.__table__  # type: ignore[attr-defined]
DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10000


@dataclass(frozen=True)
class WorkingSet:
    """A working set as the domain sees it."""

    sandbox: str
    working_set_id: str
    run: str
    activity: str
    entity_id: str
    count: int
    create_time: datetime
    expire_time: datetime

    @property
    def name(self) -> str:
        """The resource name, ``workingSets/{working_set}``."""
        return f"workingSets/{self.working_set_id}"

    @property
    def dimension(self) -> str:
        """The dimension's resource name, ``entities/{entity}``."""
        return f"entities/{self.entity_id}"


@dataclass(frozen=True)
class WorkingSetRecord:
    """One streamed row: its position, key text, identity (namespace, value) and requested values."""

    position: int
    entity_key: str
    identity: tuple[str, str] | None
    values: dict[str, PyValue]


@dataclass(frozen=True)
class StreamPlan:
    """What a stream reads: the working set, its dimension, its table and the attributes to return."""

    working_set: WorkingSet
    entity: Entity
    table: sa.Table
    attributes: tuple[str, ...]


def batch_size(requested: int, field: str = "batch_size") -> int:
    """The effective batch size: the default for 0; negative or above the maximum is invalid."""
    if requested < 0 or requested > MAX_BATCH_SIZE:
        raise InvalidArgument(
            f"{field} must be between 0 and {MAX_BATCH_SIZE}", field=field, reason="INVALID_BATCH_SIZE"
        )
    return requested or DEFAULT_BATCH_SIZE


def working_set_table(table_name: str, entity: Entity) -> sa.Table:
    """The Core table of a working set of ``entity``: position, then one column per key attribute."""
    columns = [
        sa.Column(f"k{i}", column_type(a.type), nullable=False)
        for i, a in enumerate(entity.schema.key_attributes, start=1)
    ]
    return sa.Table(
        table_name,
        sa.MetaData(),
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        *columns,
    )


class WorkingSetStore:
    """The working sets of one database."""

    def __init__(
        self,
        catalog: EntityCatalog,
        *,
        limits: FilterLimits | None = None,
        retention: timedelta = timedelta(days=5),
    ) -> None:
        self.catalog = catalog
        self.database: Database = catalog.database
        self.limits = limits or FilterLimits()
        self.retention = retention

    def build(self, sandbox: str, run: str, activity: str, query: AudienceQuery) -> WorkingSet:
        """The working set of ``run``'s ``activity``: the existing one, or a new one from ``query``."""
        parse_name(run, "campaigns", "runs", field="run")
        validate_id(activity, "activity")
        entity, where = resolve_query(self.catalog, sandbox, query, self.limits)
        existing = self._find(sandbox, run, activity)
        if existing is not None:
            return existing
        now = utcnow()
        working_set_id = new_id("ws")
        table_name = f"ws_{uuid.uuid4().hex}"
        table = working_set_table(table_name, entity)
        keys = entity.key_columns()
        selection = sa.select(
            sa.func.row_number().over(order_by=keys).label("position"),
            *[column.label(f"k{i}") for i, column in enumerate(keys, start=1)],
        ).where(where)
        try:
            with self.database.engine.begin() as conn:
                # The catalog row goes first so that SQLite's driver has begun the transaction
                # before the CREATE TABLE: table, rows and catalog row commit or roll back together.
                conn.execute(
                    _catalog.insert().values(
                        sandbox=sandbox,
                        working_set_id=working_set_id,
                        table_name=table_name,
                        run=run,
                        activity=activity,
                        entity_id=entity.entity_id,
                        count=0,
                        create_time=now,
                        expire_time=now + self.retention,
                    )
                )
                table.create(conn)
                inserted = conn.execution_options(preserve_rowcount=True).execute(
                    table.insert().from_select(["position", *[f"k{i}" for i in range(1, len(keys) + 1)]], selection)
                )
                count = inserted.rowcount
                conn.execute(
                    _catalog.update()
                    .where(_catalog.c.sandbox == sandbox, _catalog.c.working_set_id == working_set_id)
                    .values(count=count)
                )
        except sa.exc.IntegrityError:
            # Another call built this run's activity concurrently: return its working set.
            existing = self._find(sandbox, run, activity)
            if existing is None:
                raise
            return existing
        log.info("working set built", run=run, activity=activity, working_set=working_set_id, count=count)
        return WorkingSet(
            sandbox=sandbox,
            working_set_id=working_set_id,
            run=run,
            activity=activity,
            entity_id=entity.entity_id,
            count=count,
            create_time=now,
            expire_time=now + self.retention,
        )

    def get(self, sandbox: str, working_set_id: str, *, field: str = "name") -> WorkingSet:
        """One working set; NotFound naming ``field`` when it does not exist (or was purged)."""
        return self._working_set_of(self._row(sandbox, working_set_id, field))

    def open_stream(
        self, sandbox: str, working_set_id: str, attributes: list[str] | tuple[str, ...], *, field: str = "working_set"
    ) -> StreamPlan:
        """Check the working set and the requested attributes, and plan the batches of a stream."""
        row = self._row(sandbox, working_set_id, field)
        working_set = self._working_set_of(row)
        entity = self.catalog.get_entity(sandbox, working_set.entity_id, field=field)
        violations = [
            FieldViolation(f"attributes[{i}]", f"unknown attribute {name!r} of entity {entity.entity_id!r}")
            for i, name in enumerate(attributes)
            if entity.schema.attribute(name) is None
        ]
        if violations:
            raise invalid_argument("unknown attributes", violations, "UNKNOWN_ATTRIBUTE")
        return StreamPlan(
            working_set=working_set,
            entity=entity,
            table=working_set_table(row["table_name"], entity),
            attributes=tuple(dict.fromkeys(attributes)),
        )

    def read_batch(self, plan: StreamPlan, after_position: int, limit: int) -> list[WorkingSetRecord]:
        """Up to ``limit`` rows after ``after_position``, in position order (one query)."""
        if after_position < 0:
            raise InvalidArgument("after_position must not be negative", field="after_position")
        entity = plan.entity
        schema = entity.schema
        ws = plan.table
        records = entity.table
        identity = schema.identity
        needed = list(
            dict.fromkeys([*schema.primary_key, *([identity.attribute] if identity else []), *plan.attributes])
        )
        join = sa.and_(
            *[ws.c[f"k{i}"] == column for i, column in enumerate(entity.key_columns(), start=1)],
        )
        statement = (
            sa.select(ws.c.position, *[records.c[name] for name in needed])
            .select_from(ws.join(records, join))
            .where(ws.c.position > after_position)
            .order_by(ws.c.position)
            .limit(limit)
        )
        try:
            with self.database.engine.connect() as conn:
                rows = conn.execute(statement).all()
        except sa.exc.DBAPIError:
            # The working set may have been purged while it was being streamed.
            self._row(plan.working_set.sandbox, plan.working_set.working_set_id, "working_set")
            raise
        key_attributes = schema.key_attributes
        result: list[WorkingSetRecord] = []
        for row in rows:
            by_name: dict[str, Any] = dict(zip(needed, row[1:], strict=True))
            identity_value = None
            if identity is not None:
                attribute = schema.attribute(identity.attribute)
                assert attribute is not None
                text = canonical_text(from_database(attribute.type, by_name[identity.attribute]))
                identity_value = (identity.namespace, text)
            values: dict[str, PyValue] = {}
            for name in plan.attributes:
                attribute = schema.attribute(name)
                assert attribute is not None
                values[name] = from_database(attribute.type, by_name[name])
            result.append(
                WorkingSetRecord(
                    position=int(row[0]),
                    entity_key=stored_key_text(key_attributes, [by_name[n] for n in schema.primary_key]),
                    identity=identity_value,
                    values=values,
                )
            )
        return result

    def purge_expired(self, now: datetime | None = None) -> int:
        """Drop every working set (table and catalog row) expired at ``now``; return how many."""
        moment = now or utcnow()
        with self.database.engine.connect() as conn:
            expired = conn.execute(
                sa.select(_catalog.c.sandbox, _catalog.c.working_set_id, _catalog.c.table_name).where(
                    _catalog.c.expire_time <= moment
                )
            ).all()
        for sandbox, working_set_id, table_name in expired:
            with self.database.engine.begin() as conn:
                # Delete first (it opens the transaction on SQLite), then drop the table with it.
                conn.execute(
                    _catalog.delete().where(_catalog.c.sandbox == sandbox, _catalog.c.working_set_id == working_set_id)
                )
                conn.execute(sa.schema.DropTable(sa.Table(table_name, sa.MetaData()), if_exists=True))
            log.info("working set purged", sandbox=sandbox, working_set=working_set_id)
        return len(expired)

    def _find(self, sandbox: str, run: str, activity: str) -> WorkingSet | None:
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(_catalog).where(
                        _catalog.c.sandbox == sandbox, _catalog.c.run == run, _catalog.c.activity == activity
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else self._working_set_of(row)

    def _row(self, sandbox: str, working_set_id: str, field: str) -> sa.RowMapping:
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(_catalog).where(
                        _catalog.c.sandbox == sandbox, _catalog.c.working_set_id == working_set_id
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(
                f"working set {working_set_id!r} does not exist", field=field, reason="WORKING_SET_NOT_FOUND"
            )
        return row

    @staticmethod
    def _working_set_of(row: sa.RowMapping) -> WorkingSet:
        create_time = as_utc(row["create_time"])
        expire_time = as_utc(row["expire_time"])
        assert create_time is not None and expire_time is not None
        return WorkingSet(
            sandbox=row["sandbox"],
            working_set_id=row["working_set_id"],
            run=row["run"],
            activity=row["activity"],
            entity_id=row["entity_id"],
            count=int(row["count"]),
            create_time=create_time,
            expire_time=expire_time,
        )
