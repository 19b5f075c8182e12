"""Working sets: the population of one run's targeting activity, materialized as a table.

Building one creates ``ws_<random hex>`` with a ``position`` column (1, 2, … in primary-key order)
and one column per primary-key attribute of the dimension (``k1``, ``k2``, … so that no attribute
name can collide with ``position``), filled by a single ``INSERT INTO ws SELECT row_number() OVER
(ORDER BY key), key FROM entity WHERE <filter>`` statement, plus a catalog row. A run's activity has
at most one working set: building it again returns the existing one unchanged.

Rows are read back with keyset pagination: one ``… JOIN entity ON key WHERE position > :after ORDER
BY position LIMIT :n`` per batch, so memory is bounded by the batch size. A batch's statements (the
rows, then one per collection) run in one read-only transaction that reads one snapshot
(REPEATABLE READ on PostgreSQL; an explicit deferred ``BEGIN`` on SQLite, whose driver would
otherwise run each read on its own): a batch is consistent with itself. A record deleted from the
entity after the build is skipped (its position is simply absent). Working sets expire after the
retention period; :meth:`WorkingSetStore.purge_expired` drops their tables and catalog rows.

Besides build, working sets come from other working sets, each operation one set-based statement
per produced working set and idempotent on (run, activity): combine (union / intersection /
exclusion), change dimension (through a link, counting the source records that reach nothing),
split (ordered subsets with filter, limit by count or percent with a sort, overlap on or off,
complement) and deduplication (per group of field values, keep N by a method; complement).
A source working set purged while an operation reads it (its table dropped under the
statement) makes the operation NOT_FOUND naming the source's field, not INTERNAL
(:meth:`WorkingSetStore.reading`). Two calls for the same (run, activity) at once (a retried call
racing the first, parallel branches) both return the one working set that commits: the catalog's
unique (run, activity) key refuses the second, which then returns the first's.
Streams can enrich rows with many-to-one dot paths (one LEFT JOIN per link), aggregates of
linked records (one correlated scalar subquery each) and collections of the first N linked records
by a sort (one windowed statement per collection and batch, see
:mod:`audience_svc.collection_enrichment`). Incremental builds (:mod:`audience_svc.incremental`)
and reconciliation (:mod:`audience_svc.reconciliation`) materialize through the same store.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from audience_svc.audiences import resolve_query
from audience_svc.coercion import (
    CoercionError,
    RawValue,
    canonical_text,
    coerce_operand,
    from_database,
    stored_key_text,
)
from audience_svc.collection_enrichment import (
    MAX_COLLECTIONS,
    Collection,
    CollectionPlan,
    collection_statement,
    plan_collection,
)
from audience_svc.entities import EntityCatalog
from audience_svc.query import (
    Aggregate,
    AudienceQuery,
    Bindings,
    Filter,
    FilterLimits,
    compile_aggregate,
    compile_filter,
    join_condition,
)
from audience_svc.schema import MANY_TO_ONE, Attribute, Entity, Link, checked_link_target, column_type
from audience_svc.tables import WorkingSetRow
from audience_svc.violations import invalid_argument
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import FieldViolation, InvalidArgument, NotFound
from carillon_chassis.names import new_id, parse_name, validate_id
from carillon_chassis.values import PyValue

log = structlog.get_logger("carillon.audience.working_sets")

_catalog: sa.Table = WorkingSetRow.__table__  # type: ignore[attr-defined]
DEDUPLICATION_METHODS = ("random", "highest", "lowest", "non_empty", "priority")
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
    # Collection enrichments: by alias, the first linked records, each its attribute values.
    collections: dict[str, list[dict[str, PyValue]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Subset:
    """One subset of a split: its activity, filter, limit (count or percent) and sort order.

    ``order_by`` holds (attribute, descending) pairs; a limit of 0 (and percent 0) means no limit.
    """

    activity: str
    filter: Filter | None = None
    limit: int = 0
    limit_percent: float = 0.0
    order_by: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class StreamPlan:
    """What a stream reads: the working set, its dimension, its table and the attributes to return."""

    working_set: WorkingSet
    entity: Entity
    table: sa.Table
    attributes: tuple[str, ...]
    # Requested dot paths through many-to-one links (enrichment): their hops and final attribute.
    paths: dict[str, tuple[tuple[tuple[Link, Entity], ...], Attribute]] = field(default_factory=dict)
    # Aggregates of linked records (enrichment): alias, scalar subquery and value type.
    aggregates: tuple[tuple[str, sa.ColumnElement[Any], str], ...] = ()
    # Collections of the first linked records by a sort (1-N enrichment).
    collections: tuple[CollectionPlan, ...] = ()


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


@contextlib.contextmanager
def _snapshot(database: Database) -> Iterator[sa.Connection]:
    """A read-only transaction whose statements all read one snapshot of the database."""
    with database.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                yield conn
            return
        with conn.begin():
            # pysqlite begins no transaction for reads: without this each SELECT reads its own snapshot.
            conn.exec_driver_sql("BEGIN")
            yield conn


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

    def build(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: AudienceQuery | None,
        bindings: Bindings | None = None,
        *,
        resolved: tuple[Entity, sa.ColumnElement[bool]] | None = None,
    ) -> WorkingSet:
        """The working set of ``run``'s ``activity``: the existing one, or a new one from ``query``
        (or from an already ``resolved`` dimension and WHERE expression, such as a saved audience's)."""
        parse_name(run, "campaigns", "runs", field="run")
        validate_id(activity, "activity")
        if resolved is None:
            assert query is not None
            resolved = resolve_query(self.catalog, sandbox, query, self.limits, bindings=bindings)
        entity, where = resolved
        existing = self._find(sandbox, run, activity)
        if existing is not None:
            return existing
        keys = entity.key_columns()
        selection = sa.select(
            sa.func.row_number().over(order_by=keys).label("position"),
            *[column.label(f"k{i}") for i, column in enumerate(keys, start=1)],
        ).where(where)
        return self.materialize(sandbox, run, activity, entity, selection)

    def combine(
        self, sandbox: str, run: str, activity: str, primary: str, others: list[str], operation: str
    ) -> WorkingSet:
        """The working set of ``run``'s ``activity``: ``primary`` combined with ``others``.

        ``union`` keeps the records of any of them, ``intersection`` those of all of them and
        ``exclusion`` those of ``primary`` in none of the others. Every working set must have the
        same dimension. Idempotent like :meth:`build`.
        """
        parse_name(run, "campaigns", "runs", field="run")
        validate_id(activity, "activity")
        if operation not in ("union", "intersection", "exclusion"):
            raise InvalidArgument("the operation must be UNION, INTERSECTION or EXCLUSION", field="operation")
        if not others:
            raise InvalidArgument("combine at least one other working set", field="others")
        first = self.get(sandbox, primary, field="primary")
        entity = self.catalog.get_entity(sandbox, first.entity_id, field="primary")
        width = len(entity.schema.primary_key)
        sources = [working_set_table(self.table_name(sandbox, primary, field="primary"), entity)]
        for i, other in enumerate(others):
            found = self.get(sandbox, other, field=f"others[{i}]")
            if found.entity_id != entity.entity_id:
                raise InvalidArgument(
                    f"working set {other!r} has dimension {found.entity_id!r}, not {entity.entity_id!r}",
                    field=f"others[{i}]",
                    reason="DIMENSION_MISMATCH",
                )
            sources.append(working_set_table(self.table_name(sandbox, other, field=f"others[{i}]"), entity))
        existing = self._find(sandbox, run, activity)
        if existing is not None:
            return existing
        names = [f"k{i}" for i in range(1, width + 1)]
        selects = [sa.select(*[source.c[n] for n in names]) for source in sources]
        compound: sa.CompoundSelect[Any]
        if operation == "union":
            compound = sa.union(*selects)
        elif operation == "intersection":
            compound = sa.intersect(*selects)
        else:
            rest = sa.union(*selects[1:]).subquery()
            compound = sa.except_(selects[0], sa.select(*[rest.c[n] for n in names]))
        keys = compound.subquery()
        selection = sa.select(
            sa.func.row_number().over(order_by=[keys.c[n] for n in names]).label("position"),
            *[keys.c[n] for n in names],
        )
        with self.reading(sandbox, {"primary": primary, **{f"others[{i}]": o for i, o in enumerate(others)}}):
            return self.materialize(sandbox, run, activity, entity, selection)

    def change_dimension(
        self, sandbox: str, run: str, activity: str, source_id: str, link_name: str
    ) -> tuple[WorkingSet, int]:
        """The records reached from a working set through one link, and how many source records reach none.

        Through a many-to-one link each source record reaches at most one record; through a
        one-to-many link it reaches all its linked records. Records reached several times appear
        once. Source records without a match are counted (``unmatched``), never silently lost.
        """
        parse_name(run, "campaigns", "runs", field="run")
        validate_id(activity, "activity")
        found = self.get(sandbox, source_id, field="working_set")
        source_entity = self.catalog.get_entity(sandbox, found.entity_id, field="working_set")
        link = source_entity.schema.link(link_name)
        if link is None:
            raise InvalidArgument(
                f"unknown link {link_name!r} of entity {source_entity.entity_id!r}", field="link", reason="UNKNOWN_LINK"
            )
        target = self.catalog.get_entity(sandbox, link.target, field="link")
        checked_link_target(link, target)
        ws = working_set_table(self.table_name(sandbox, source_id), source_entity)
        records = source_entity.table.alias("src")
        linked = target.table.alias("dst")
        on_key = sa.and_(
            *[
                ws.c[f"k{i}"] == c
                for i, c in enumerate([records.c[n] for n in source_entity.schema.primary_key], start=1)
            ]
        )
        on_link = join_condition(link, records, linked)
        target_keys = [linked.c[n] for n in target.schema.primary_key]
        reached = (
            sa.select(*[c.label(f"k{i}") for i, c in enumerate(target_keys, start=1)])
            .select_from(ws.join(records, on_key).join(linked, on_link))
            .distinct()
            .subquery()
        )
        names = [f"k{i}" for i in range(1, len(target_keys) + 1)]
        selection = sa.select(
            sa.func.row_number().over(order_by=[reached.c[n] for n in names]).label("position"),
            *[reached.c[n] for n in names],
        )
        # Source records whose record is gone, or that reach no record through the link.
        any_linked = sa.select(sa.literal(1)).select_from(linked).where(on_link).correlate_except(linked).exists()
        matched = sa.select(sa.literal(1)).select_from(records).where(on_key, any_linked).correlate_except(records)
        unmatched_statement = sa.select(sa.func.count()).select_from(ws).where(~matched.exists())
        with self.reading(sandbox, {"working_set": source_id}):
            with self.database.engine.connect() as conn:
                unmatched = int(conn.execute(unmatched_statement).scalar_one())
            existing = self._find(sandbox, run, activity)
            if existing is not None:
                return existing, unmatched
            return self.materialize(sandbox, run, activity, target, selection), unmatched

    def split(
        self,
        sandbox: str,
        run: str,
        source_id: str,
        subsets: list[Subset],
        *,
        complement_activity: str = "",
        overlap: bool = False,
        bindings: Bindings | None = None,
    ) -> tuple[list[WorkingSet], WorkingSet | None]:
        """Split a working set into ordered subsets (each its own working set), and optionally a complement.

        Each subset takes the source records matching its filter (all when None) in its sort order
        (then key order), up to its limit (a count, or a percentage of the matching records, rounded
        down). Without ``overlap`` a record goes to the first subset that takes it: later subsets
        only see records no earlier subset took. The complement holds the source records no subset
        took. Each subset is idempotent on (run, activity) like :meth:`build`, so a retried split
        returns the subsets already built and builds the rest.
        """
        parse_name(run, "campaigns", "runs", field="run")
        found = self.get(sandbox, source_id, field="working_set")
        entity = self.catalog.get_entity(sandbox, found.entity_id, field="working_set")
        activities = [subset.activity for subset in subsets] + ([complement_activity] if complement_activity else [])
        for i, subset in enumerate(subsets):
            validate_id(subset.activity, f"subsets[{i}].activity")
            if subset.limit < 0 or not 0 <= subset.limit_percent <= 100 or (subset.limit and subset.limit_percent):
                raise InvalidArgument(
                    "set at most one of limit (>= 0) and limit_percent (0-100)", field=f"subsets[{i}].limit"
                )
            for j, (name, _) in enumerate(subset.order_by):
                if entity.schema.attribute(name) is None:
                    raise InvalidArgument(
                        f"unknown attribute {name!r} of entity {entity.entity_id!r}",
                        field=f"subsets[{i}].order_by[{j}].attribute",
                        reason="UNKNOWN_ATTRIBUTE",
                    )
        if complement_activity:
            validate_id(complement_activity, "complement_activity")
        if not subsets:
            raise InvalidArgument("a split needs at least one subset", field="subsets")
        if len(set(activities)) != len(activities):
            raise InvalidArgument("every subset (and the complement) needs its own activity", field="subsets")

        def resolve(entity_id: str) -> Entity | None:
            try:
                return self.catalog.get_entity(sandbox, entity_id)
            except NotFound:
                return None

        wheres = [
            compile_filter(
                entity,
                subset.filter,
                limits=self.limits,
                path=f"subsets[{i}].filter",
                resolve=resolve,
                bindings=bindings,
            )
            for i, subset in enumerate(subsets)
        ]
        source = working_set_table(self.table_name(sandbox, source_id), entity)
        records = entity.table
        keys = entity.key_columns()
        width = len(keys)
        on_key = sa.and_(*[source.c[f"k{i}"] == column for i, column in enumerate(keys, start=1)])
        taken: list[sa.Table] = []
        built: list[WorkingSet] = []

        def untaken() -> list[sa.ColumnElement[bool]]:
            conditions: list[sa.ColumnElement[bool]] = []
            for table in taken:
                alias = table.alias()
                match = sa.and_(*[alias.c[f"k{i}"] == column for i, column in enumerate(keys, start=1)])
                conditions.append(~sa.select(sa.literal(1)).select_from(alias).where(match).exists())
            return conditions

        for subset, where in zip(subsets, wheres, strict=True):
            candidates = sa.and_(where, *untaken())
            limit: int | None = subset.limit or None
            if subset.limit_percent:
                with self.reading(sandbox, {"working_set": source_id}), self.database.engine.connect() as conn:
                    matching = conn.execute(
                        sa.select(sa.func.count()).select_from(source.join(records, on_key)).where(candidates)
                    ).scalar_one()
                limit = int(matching * subset.limit_percent // 100)
            order = [
                records.c[name].desc() if descending else records.c[name].asc() for name, descending in subset.order_by
            ]
            chosen = (
                sa.select(*[column.label(f"k{i}") for i, column in enumerate(keys, start=1)])
                .select_from(source.join(records, on_key))
                .where(candidates)
                .order_by(*[o.nulls_last() for o in order], *keys)
            )
            if limit is not None:
                chosen = chosen.limit(limit)
            picked = chosen.subquery()
            names = [f"k{i}" for i in range(1, width + 1)]
            selection = sa.select(
                sa.func.row_number().over(order_by=[picked.c[n] for n in names]).label("position"),
                *[picked.c[n] for n in names],
            )
            with self.reading(sandbox, {"working_set": source_id}):
                working_set = self._find(sandbox, run, subset.activity) or self.materialize(
                    sandbox, run, subset.activity, entity, selection
                )
            built.append(working_set)
            if not overlap:
                taken.append(working_set_table(self.table_name(sandbox, working_set.working_set_id), entity))
        complement = None
        if complement_activity:
            rest = [working_set_table(self.table_name(sandbox, w.working_set_id), entity) for w in built]
            conditions = []
            for table in rest:
                alias = table.alias()
                match = sa.and_(*[alias.c[f"k{i}"] == source.c[f"k{i}"] for i in range(1, width + 1)])
                conditions.append(~sa.select(sa.literal(1)).select_from(alias).where(match).exists())
            selection = sa.select(
                sa.func.row_number().over(order_by=[source.c[f"k{i}"] for i in range(1, width + 1)]).label("position"),
                *[source.c[f"k{i}"] for i in range(1, width + 1)],
            ).where(*conditions)
            with self.reading(sandbox, {"working_set": source_id}):
                complement = self._find(sandbox, run, complement_activity) or self.materialize(
                    sandbox, run, complement_activity, entity, selection
                )
        return built, complement

    def deduplicate(
        self,
        sandbox: str,
        run: str,
        activity: str,
        source_id: str,
        fields: list[str],
        *,
        keep: int = 1,
        method: str = "lowest",
        attribute: str = "",
        priority: tuple[RawValue, ...] = (),
        complement_activity: str = "",
    ) -> tuple[WorkingSet, WorkingSet | None]:
        """Keep at most ``keep`` records per combination of ``fields`` values; optionally the removed ones too.

        Which records are kept, per group: ``random``; ``highest`` or ``lowest`` value of
        ``attribute`` (NULLs last); ``non_empty`` (records where ``attribute`` is set first); or
        ``priority`` (records whose ``attribute`` comes earliest in ``priority`` first). Ties go in key
        order. Records with NULL in a field form one group per combination, as SQL's PARTITION BY
        does. Idempotent per (run, activity) like :meth:`build`.
        """
        parse_name(run, "campaigns", "runs", field="run")
        validate_id(activity, "activity")
        if complement_activity:
            validate_id(complement_activity, "complement_activity")
            if complement_activity == activity:
                raise InvalidArgument("the complement needs its own activity", field="complement_activity")
        found = self.get(sandbox, source_id, field="working_set")
        entity = self.catalog.get_entity(sandbox, found.entity_id, field="working_set")
        schema = entity.schema
        if not fields:
            raise InvalidArgument("deduplicate on at least one field", field="fields")
        for i, name in enumerate(fields):
            if schema.attribute(name) is None:
                raise InvalidArgument(
                    f"unknown attribute {name!r} of entity {entity.entity_id!r}",
                    field=f"fields[{i}]",
                    reason="UNKNOWN_ATTRIBUTE",
                )
        if keep < 1:
            raise InvalidArgument("keep at least one record per group", field="keep")
        if method not in DEDUPLICATION_METHODS:
            raise InvalidArgument(f"the method must be one of {', '.join(DEDUPLICATION_METHODS)}", field="method")
        records = entity.table
        keys = entity.key_columns()
        order: list[sa.ColumnElement[Any]] = []
        if method == "random":
            order = [sa.func.random()]
        else:
            chosen = schema.attribute(attribute)
            if chosen is None:
                raise InvalidArgument(f"{method} needs an attribute of entity {entity.entity_id!r}", field="attribute")
            column = records.c[chosen.name]
            if method == "highest":
                order = [column.desc().nulls_last()]
            elif method == "lowest":
                order = [column.asc().nulls_last()]
            elif method == "non_empty":
                order = [sa.case((column.is_(None), 1), else_=0)]
            else:
                if not priority:
                    raise InvalidArgument("priority needs at least one value", field="priority")
                ranks = []
                for j, raw in enumerate(priority):
                    try:
                        ranks.append((column == coerce_operand(chosen.type, raw, chosen.enum_values), j))
                    except CoercionError as exc:
                        raise InvalidArgument(str(exc), field=f"priority[{j}]") from exc
                order = [sa.case(*ranks, else_=len(priority))]
        source = working_set_table(self.table_name(sandbox, source_id), entity)
        width = len(keys)
        names = [f"k{i}" for i in range(1, width + 1)]
        on_key = sa.and_(*[source.c[n] == column for n, column in zip(names, keys, strict=True)])
        ranked = (
            sa.select(
                *[column.label(n) for n, column in zip(names, keys, strict=True)],
                sa.func.row_number()
                .over(partition_by=[records.c[name] for name in fields], order_by=[*order, *keys])
                .label("rank"),
            )
            .select_from(source.join(records, on_key))
            .subquery()
        )

        kept = sa.select(
            sa.func.row_number().over(order_by=[ranked.c[n] for n in names]).label("position"),
            *[ranked.c[n] for n in names],
        ).where(ranked.c.rank <= keep)
        with self.reading(sandbox, {"working_set": source_id}):
            result = self._find(sandbox, run, activity) or self.materialize(sandbox, run, activity, entity, kept)
        complement = None
        if complement_activity:
            # The source records the result did not keep (computed from the stored result, so that
            # even a random choice leaves the two sets disjoint and complete).
            taken = working_set_table(self.table_name(sandbox, result.working_set_id), entity).alias()
            match = sa.and_(*[taken.c[n] == source.c[n] for n in names])
            removed = sa.select(
                sa.func.row_number().over(order_by=[source.c[n] for n in names]).label("position"),
                *[source.c[n] for n in names],
            ).where(~sa.select(sa.literal(1)).select_from(taken).where(match).exists())
            with self.reading(sandbox, {"working_set": source_id}):
                complement = self._find(sandbox, run, complement_activity) or self.materialize(
                    sandbox, run, complement_activity, entity, removed
                )
        return result, complement

    def find(self, sandbox: str, run: str, activity: str) -> WorkingSet | None:
        """The working set of ``run``'s ``activity``, or None when it has none (yet, or any more)."""
        return self._find(sandbox, run, activity)

    def materialize(
        self,
        sandbox: str,
        run: str,
        activity: str,
        entity: Entity,
        selection: sa.Select[Any] | Callable[[sa.Connection], sa.Select[Any]],
        *,
        then: Callable[[sa.Connection, sa.Table, int], None] | None = None,
    ) -> WorkingSet:
        """Create the working set of ``run``'s ``activity`` from ``selection`` (position, k1, k2, …).

        ``selection`` may be a function of the connection, called inside the transaction before the
        rows are inserted (to take a lock and read state the selection depends on). ``then`` runs
        in the same transaction after the rows are inserted, with the connection, the new table and
        the row count: what it writes commits or rolls back with the working set.
        When another call built the activity concurrently, that working set is returned (and
        ``then`` has not run).
        """
        try:
            with self.database.engine.begin() as conn:
                built, table = self._create(conn, sandbox, run, activity, entity, selection)
                if then is not None:
                    then(conn, table, built.count)
        except sa.exc.IntegrityError:
            # Another call built this run's activity concurrently: return its working set.
            existing = self._find(sandbox, run, activity)
            if existing is None:
                raise
            return existing
        log.info("working set built", run=run, activity=activity, working_set=built.working_set_id, count=built.count)
        return built

    def materialize_in(
        self, conn: sa.Connection, sandbox: str, run: str, activity: str, entity: Entity, selection: sa.Select[Any]
    ) -> WorkingSet:
        """Create the working set of ``run``'s ``activity`` in the caller's transaction ``conn`` (for
        example a second working set from a :meth:`materialize` ``then`` hook: both commit together).

        An IntegrityError when the activity already has a working set rolls back the whole transaction.
        """
        return self._create(conn, sandbox, run, activity, entity, selection)[0]

    def _create(
        self,
        conn: sa.Connection,
        sandbox: str,
        run: str,
        activity: str,
        entity: Entity,
        selection: sa.Select[Any] | Callable[[sa.Connection], sa.Select[Any]],
    ) -> tuple[WorkingSet, sa.Table]:
        now = utcnow()
        working_set_id = new_id("ws")
        table_name = f"ws_{uuid.uuid4().hex}"
        table = working_set_table(table_name, entity)
        keys = entity.key_columns()
        # The catalog row goes first so that SQLite's driver has begun the transaction before the
        # CREATE TABLE: table, rows and catalog row commit or roll back together.
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
        select = selection(conn) if callable(selection) else selection
        inserted = conn.execution_options(preserve_rowcount=True).execute(
            table.insert().from_select(["position", *[f"k{i}" for i in range(1, len(keys) + 1)]], select)
        )
        count = inserted.rowcount
        conn.execute(
            _catalog.update()
            .where(_catalog.c.sandbox == sandbox, _catalog.c.working_set_id == working_set_id)
            .values(count=count)
        )
        working_set = WorkingSet(
            sandbox=sandbox,
            working_set_id=working_set_id,
            run=run,
            activity=activity,
            entity_id=entity.entity_id,
            count=count,
            create_time=now,
            expire_time=now + self.retention,
        )
        return working_set, table

    def table_name(self, sandbox: str, working_set_id: str, *, field: str = "working_set") -> str:
        """The name of a working set's table; NotFound naming ``field`` when it does not exist."""
        return str(self._row(sandbox, working_set_id, field)["table_name"])

    def get(self, sandbox: str, working_set_id: str, *, field: str = "name") -> WorkingSet:
        """One working set; NotFound naming ``field`` when it does not exist (or was purged)."""
        return self._working_set_of(self._row(sandbox, working_set_id, field))

    @contextlib.contextmanager
    def reading(self, sandbox: str, sources: dict[str, str]) -> Iterator[None]:
        """Statements that read the working sets ``sources`` (request field → working set id).

        A database error raised after one of them was purged meanwhile (its table dropped under the
        statement) becomes NotFound naming that source's field; any other error is raised as it is.
        """
        try:
            yield
        except sa.exc.DBAPIError:
            for source_field, working_set_id in sources.items():
                self._row(sandbox, working_set_id, source_field)
            raise

    def open_stream(
        self,
        sandbox: str,
        working_set_id: str,
        attributes: list[str] | tuple[str, ...],
        *,
        field: str = "working_set",
        aggregates: tuple[Aggregate, ...] = (),
        collections: tuple[Collection, ...] = (),
        bindings: Bindings | None = None,
    ) -> StreamPlan:
        """Check the working set, the requested attributes and enrichments, and plan the batches of a stream.

        ``aggregates`` add one column each: an aggregate of the records linked to each row (for
        example the number of its bookings in the last 30 days), under its alias. ``collections``
        add one list each: the first linked records of each row by a sort, under its alias.
        """
        row = self._row(sandbox, working_set_id, field)
        working_set = self._working_set_of(row)
        entity = self.catalog.get_entity(sandbox, working_set.entity_id, field=field)
        violations: list[FieldViolation] = []
        paths: dict[str, tuple[tuple[tuple[Link, Entity], ...], Attribute]] = {}
        for i, name in enumerate(attributes):
            *link_names, leaf = name.split(".")
            current = entity
            hops: list[tuple[Link, Entity]] = []
            problem = ""
            for link_name in link_names[: self.limits.max_path_links + 1]:
                link = current.schema.link(link_name)
                if link is None or link.cardinality != MANY_TO_ONE:
                    kind = "not a many-to-one link" if link is not None else "not a link"
                    problem = f"in {name!r}, {link_name!r} is {kind} of entity {current.entity_id!r}"
                    break
                current = self.catalog.get_entity(sandbox, link.target, field=f"attributes[{i}]")
                hops.append((link, current))
            if not problem and len(link_names) > self.limits.max_path_links:
                problem = f"{name!r} goes through more than {self.limits.max_path_links} links (max_path_links)"
            attribute = None if problem else current.schema.attribute(leaf)
            if not problem and attribute is None:
                problem = f"unknown attribute {leaf!r} of entity {current.entity_id!r}"
            if problem:
                violations.append(FieldViolation(f"attributes[{i}]", problem))
            elif hops and attribute is not None:
                paths[name] = (tuple(hops), attribute)
        if violations:
            raise invalid_argument("unknown attributes", violations, "UNKNOWN_ATTRIBUTE")

        def resolve(entity_id: str) -> Entity | None:
            try:
                return self.catalog.get_entity(sandbox, entity_id)
            except NotFound:
                return None

        columns: list[tuple[str, sa.ColumnElement[Any], str]] = []
        seen = set(attributes)

        def claim(alias: str, field: str, what: str) -> None:
            if not alias or alias in seen:
                raise InvalidArgument(
                    f"each {what} needs an alias unlike every attribute and other alias",
                    field=field,
                    reason="INVALID_ENRICHMENT",
                )
            seen.add(alias)

        for i, aggregate in enumerate(aggregates):
            claim(aggregate.alias, f"enrichments[{i}].alias", "enrichment")
            scalar, value_type = compile_aggregate(
                entity, aggregate, limits=self.limits, path=f"enrichments[{i}]", resolve=resolve, bindings=bindings
            )
            columns.append((aggregate.alias, scalar, value_type))
        if len(collections) > MAX_COLLECTIONS:
            raise InvalidArgument(
                f"at most {MAX_COLLECTIONS} collections per stream; got {len(collections)}",
                field="collections",
                reason="INVALID_ENRICHMENT",
            )
        planned: list[CollectionPlan] = []
        for i, collection in enumerate(collections):
            claim(collection.alias, f"collections[{i}].alias", "collection")
            planned.append(
                plan_collection(
                    entity, collection, limits=self.limits, path=f"collections[{i}]", resolve=resolve, bindings=bindings
                )
            )
        return StreamPlan(
            working_set=working_set,
            entity=entity,
            table=working_set_table(row["table_name"], entity),
            attributes=tuple(dict.fromkeys(attributes)),
            paths=paths,
            aggregates=tuple(columns),
            collections=tuple(planned),
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
        own = [name for name in plan.attributes if name not in plan.paths]
        needed = list(dict.fromkeys([*schema.primary_key, *([identity.attribute] if identity else []), *own]))
        join = sa.and_(
            *[ws.c[f"k{i}"] == column for i, column in enumerate(entity.key_columns(), start=1)],
        )
        source: sa.FromClause = ws.join(records, join)
        # Enrichment through many-to-one links: one LEFT JOIN per distinct link prefix.
        aliases: dict[tuple[str, ...], sa.FromClause] = {(): records}
        enriched: list[sa.ColumnElement[Any]] = []
        for hops, leaf in plan.paths.values():
            prefix: tuple[str, ...] = ()
            for link, target in hops:
                parent = aliases[prefix]
                prefix = (*prefix, link.name)
                if prefix not in aliases:
                    alias = target.table.alias()
                    on = sa.and_(*[parent.c[p.attribute] == alias.c[p.target_attribute] for p in link.join])
                    source = source.outerjoin(alias, on)
                    aliases[prefix] = alias
            enriched.append(aliases[prefix].c[leaf.name].label(f"path_{len(enriched)}"))
        statement = (
            sa.select(
                ws.c.position,
                *[records.c[name] for name in needed],
                *enriched,
                *[scalar.label(f"aggregate_{i}") for i, (_, scalar, _) in enumerate(plan.aggregates)],
            )
            .select_from(source)
            .where(ws.c.position > after_position)
            .order_by(ws.c.position)
            .limit(limit)
        )
        collected: dict[str, dict[int, list[dict[str, PyValue]]]] = {}
        try:
            with _snapshot(self.database) as conn:
                rows = conn.execute(statement).all()
                if rows and plan.collections:
                    # One statement per collection for the whole batch: memory stays bounded by it.
                    last = int(rows[-1][0])
                    for collection in plan.collections:
                        by_position: dict[int, list[dict[str, PyValue]]] = {}
                        found = conn.execute(collection_statement(collection, entity, ws, after_position, last))
                        for position, *linked in found:
                            by_position.setdefault(int(position), []).append(collection.values_of(linked))
                        collected[collection.alias] = by_position
        except sa.exc.DBAPIError:
            # The working set may have been purged while it was being streamed.
            self._row(plan.working_set.sandbox, plan.working_set.working_set_id, "working_set")
            raise
        key_attributes = schema.key_attributes
        result: list[WorkingSetRecord] = []
        for row in rows:
            by_name: dict[str, Any] = dict(
                zip([*needed, *plan.paths, *[enrichment for enrichment, _, _ in plan.aggregates]], row[1:], strict=True)
            )
            identity_value = None
            if identity is not None:
                attribute = schema.attribute(identity.attribute)
                assert attribute is not None
                text = canonical_text(from_database(attribute.type, by_name[identity.attribute]))
                identity_value = (identity.namespace, text)
            values: dict[str, PyValue] = {}
            for name in plan.attributes:
                attribute = plan.paths[name][1] if name in plan.paths else schema.attribute(name)
                assert attribute is not None
                values[name] = from_database(attribute.type, by_name[name])
            for enrichment, _, value_type in plan.aggregates:
                values[enrichment] = from_database(value_type, by_name[enrichment])
            result.append(
                WorkingSetRecord(
                    position=int(row[0]),
                    entity_key=stored_key_text(key_attributes, [by_name[n] for n in schema.primary_key]),
                    identity=identity_value,
                    values=values,
                    collections={alias: by_position.get(int(row[0]), []) for alias, by_position in collected.items()},
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
