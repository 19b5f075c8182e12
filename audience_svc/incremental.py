"""Incremental query: a run's working set without the records earlier runs of the campaign produced.

The state belongs to a campaign activity on one dimension (the campaign is the one of the run, so
every incremental activity of a campaign has its own history), in one of two modes:

* **processed keys** (:class:`ProcessedKeys`): every key a run produces is recorded, with the run
  and the run's reference time, in a typed table ``pk_<hex>`` per campaign activity and dimension
  (primary key = the dimension's key). A run leaves out the matching records whose key another run
  recorded within the history window before its reference time (a zero window: ever). A key
  produced again after its window expired is recorded again with the new run and time.
* **watermark** (:class:`Watermark`): a run takes only the matching records whose date or timestamp
  attribute is greater than the watermark (records where it is NULL never), and leaves as the next
  watermark the highest value among them (or its own watermark when there is none). That highest
  value is read first, in the build's transaction, and bounds the selection: a record whose value
  rises between the statements is taken by the next run, not skipped. The first run starts from
  the optional initial watermark, or takes every record with a value.

Everything happens in the working set's own transaction (:meth:`WorkingSetStore.materialize`): the
rows, the recorded keys, the watermark and the excluded count commit together. Builds of one campaign
activity on one dimension are serialized inside that transaction before the rows are selected (a
transaction-level advisory lock on PostgreSQL; SQLite's single writer lock, already held), and the
watermark is read after it: concurrent runs never produce the same records. Only keys recorded at or
before a run's reference time exclude records from it, and a key recorded by a later run stays with
that run when an earlier run is rebuilt. Building the same
run's activity again returns the existing working set and the excluded count recorded with it; if
the working set was purged, the rebuild starts from the same state as the first build did (its own
keys are never excluded, its watermark is the one it started from).

Both filters are set-based, inside the build's single ``INSERT … SELECT``: a correlated ``NOT
EXISTS`` on the processed-key table, or a comparison with a bound watermark value.

Processed keys are purged (:meth:`IncrementalBuilder.purge_processed_keys`, run by the service's
working-set purge sweep): each processed-key table keeps the longest history window any build of
it used (a zero window, forever, once any build used it), and keys recorded before ``now - window -
working-set retention`` are deleted. A run whose working set is still retained was built within the
retention period, so (its reference time being its build time) no key it or a later run can still
see is deleted; a table with a zero window, or of an older release and not built since, is never
purged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from audience_svc.audiences import resolve_query
from audience_svc.coercion import canonical_text, from_database
from audience_svc.query import AudienceQuery, Bindings
from audience_svc.schema import Entity, column_type
from audience_svc.tables import IncrementalRunRow, ProcessedKeyTableRow
from audience_svc.working_sets import WorkingSet, WorkingSetStore
from carillon_chassis.database import as_utc, utcnow
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.names import parse_name, validate_id

log = structlog.get_logger("carillon.audience.incremental")

_runs: sa.Table = IncrementalRunRow.__table__  # type: ignore[attr-defined]
_key_tables: sa.Table = ProcessedKeyTableRow.__table__  # type: ignore[attr-defined]
DEFAULT_HISTORY_WINDOW = dt.timedelta(days=30)
# The longest history window: 100 years (a longer one would reach before year 1).
MAX_HISTORY_WINDOW = dt.timedelta(days=36525)
PROCESSED_KEYS = "processed_keys"
WATERMARK = "watermark"
WATERMARK_TYPES = ("date", "timestamp")


@dataclass(frozen=True)
class ProcessedKeys:
    """Leave out keys another run produced within ``history_window`` (zero: ever)."""

    history_window: dt.timedelta = DEFAULT_HISTORY_WINDOW


@dataclass(frozen=True)
class Watermark:
    """Take only records whose ``attribute`` is above the watermark; ``initial`` starts the first run."""

    attribute: str
    initial: dt.datetime | None = None


IncrementalMode = ProcessedKeys | Watermark


@dataclass(frozen=True)
class IncrementalBuild:
    """The working set of an incremental build and how many matching records it left out."""

    working_set: WorkingSet
    excluded: int


def _serialize(conn: sa.Connection, sandbox: str, campaign: str, activity: str, entity: Entity) -> None:
    """Serialize the builds of one campaign activity on ``entity`` until the transaction ends.

    PostgreSQL: a transaction-level advisory lock on a 64-bit hash of the four names. SQLite needs
    none: the build's transaction already holds the database's single write lock (its first
    statement wrote the working-set catalog row), so the state it reads next is the latest.
    """
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b("\x00".join((sandbox, campaign, activity, entity.entity_id)).encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def processed_keys_table(table_name: str, entity: Entity) -> sa.Table:
    """The Core table of processed keys of ``entity``: its key columns, the run and the processed time."""
    columns = [
        sa.Column(f"k{i}", column_type(a.type), primary_key=True, autoincrement=False)
        for i, a in enumerate(entity.schema.key_attributes, start=1)
    ]
    return sa.Table(
        table_name,
        sa.MetaData(),
        *columns,
        sa.Column("run", sa.String(200), nullable=False),
        sa.Column("processed_time", sa.DateTime(timezone=True), nullable=False),
    )


class IncrementalBuilder:
    """Builds working sets of incremental queries through a :class:`WorkingSetStore`."""

    def __init__(self, store: WorkingSetStore) -> None:
        self.store = store
        self.database = store.database

    def build(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: AudienceQuery | None,
        mode: IncrementalMode,
        bindings: Bindings | None = None,
        *,
        resolved: tuple[Entity, sa.ColumnElement[bool]] | None = None,
        field: str = "incremental",
    ) -> IncrementalBuild:
        """The working set of ``run``'s ``activity``: the records of ``query`` (or of an already
        ``resolved`` dimension and WHERE expression) that earlier runs of the campaign activity did not
        produce, by ``mode``. Idempotent per (run, activity) like :meth:`WorkingSetStore.build`."""
        (campaign_id, _) = parse_name(run, "campaigns", "runs", field="run")
        campaign = f"campaigns/{campaign_id}"
        validate_id(activity, "activity")
        if resolved is None:
            assert query is not None
            resolved = resolve_query(self.store.catalog, sandbox, query, self.store.limits, bindings=bindings)
        entity, where = resolved
        watermark_type = self._check(entity, mode, field)
        existing = self.store.find(sandbox, run, activity)
        if existing is not None:
            recorded = self._run_row(sandbox, run, activity)
            return IncrementalBuild(existing, int(recorded["excluded"]) if recorded is not None else 0)
        reference = as_utc(bindings.reference_time if bindings is not None else None) or utcnow()
        keys = entity.key_columns()
        row = {
            "sandbox": sandbox,
            "run": run,
            "activity": activity,
            "campaign": campaign,
            "entity_id": entity.entity_id,
            "create_time": utcnow(),
        }
        excluded = 0
        recorded_here = False

        def selection(condition: sa.ColumnElement[bool]) -> sa.Select[Any]:
            return sa.select(
                sa.func.row_number().over(order_by=keys).label("position"),
                *[column.label(f"k{i}") for i, column in enumerate(keys, start=1)],
            ).where(condition)

        # A rebuild after the working set was purged replaces what the first build recorded.
        forget = _runs.delete().where(_runs.c.sandbox == sandbox, _runs.c.run == run, _runs.c.activity == activity)

        if isinstance(mode, ProcessedKeys):
            processed = processed_keys_table(self._key_table_name(sandbox, campaign, activity, entity), entity)
            key_table_row = (
                _key_tables.c.sandbox == sandbox,
                _key_tables.c.campaign == campaign,
                _key_tables.c.activity == activity,
                _key_tables.c.entity_id == entity.entity_id,
            )
            # Keys another run recorded at or before this run's reference time (a later run's keys do
            # not count: a rebuild of an earlier run sees what its first build saw).
            seen = sa.and_(
                *[processed.c[f"k{i}"] == column for i, column in enumerate(keys, start=1)],
                processed.c.run != run,
                processed.c.processed_time <= reference,
            )
            if mode.history_window and reference - dt.datetime.min.replace(tzinfo=dt.UTC) > mode.history_window:
                seen = sa.and_(seen, processed.c.processed_time >= reference - mode.history_window)
            already = sa.select(sa.literal(1)).select_from(processed).where(seen).exists()
            width = len(keys)

            def record(conn: sa.Connection, table: sa.Table, count: int) -> None:
                nonlocal excluded, recorded_here
                recorded_here = True
                excluded = int(
                    conn.execute(
                        sa.select(sa.func.count()).select_from(entity.table).where(where, already)
                    ).scalar_one()
                )
                names = [f"k{i}" for i in range(1, width + 1)]
                # Keys produced again (after their window expired) are recorded anew with this run; a
                # key recorded after this run's reference time (by a later run, seen by a rebuild of
                # this one) stays with that later run.
                again = (
                    sa.select(sa.literal(1)).select_from(table).where(*[table.c[n] == processed.c[n] for n in names])
                )
                conn.execute(processed.delete().where(again.exists(), processed.c.processed_time <= reference))
                kept = (
                    sa.select(sa.literal(1))
                    .select_from(processed)
                    .where(*[processed.c[n] == table.c[n] for n in names])
                )
                conn.execute(
                    processed.insert().from_select(
                        [*names, "run", "processed_time"],
                        sa.select(
                            *[table.c[n] for n in names],
                            sa.literal(run, sa.String(200)),
                            sa.literal(reference, sa.DateTime(timezone=True)),
                        ).where(~kept.exists()),
                    )
                )
                conn.execute(forget)
                conn.execute(_runs.insert().values(**row, mode=PROCESSED_KEYS, excluded=excluded))
                # Keep the longest window any build used (0, forever, is the longest): the purge
                # never deletes a key a build with a longer window would still see.
                stored = _key_tables.c.history_window_s
                window_s = math.ceil(mode.history_window.total_seconds())
                longer = sa.and_(stored != 0, stored < window_s) if window_s else stored != 0
                conn.execute(
                    _key_tables.update()
                    .where(*key_table_row, sa.or_(stored.is_(None), longer))
                    .values(history_window_s=window_s)
                )

            def select(conn: sa.Connection) -> sa.Select[Any]:
                _serialize(conn, sandbox, campaign, activity, entity)
                return selection(sa.and_(where, ~already))

        else:
            attribute = mode.attribute
            column = entity.table.c[attribute]
            lower: Any = None
            upper: Any = None

            def select(conn: sa.Connection) -> sa.Select[Any]:
                nonlocal lower, upper
                _serialize(conn, sandbox, campaign, activity, entity)
                # Read inside the build's transaction, after the lock: a concurrent run of the same
                # campaign activity has committed its watermark (or not started).
                lower = self._lower_bound(conn, sandbox, run, activity, campaign, entity, mode, watermark_type)
                above = sa.and_(where, column.is_not(None) if lower is None else column > lower)
                # The next watermark is fixed before the rows are selected, and bounds them: a record
                # whose value rises meanwhile (concurrent ingest) is left for the next run, never
                # skipped by a watermark taken from a value this run did not produce.
                upper = from_database(
                    watermark_type,
                    conn.execute(sa.select(sa.func.max(column)).select_from(entity.table).where(above)).scalar_one(),
                )
                return selection(sa.and_(above, column <= upper) if upper is not None else sa.false())

            def record(conn: sa.Connection, table: sa.Table, count: int) -> None:
                nonlocal excluded, recorded_here
                recorded_here = True
                matching = int(
                    conn.execute(sa.select(sa.func.count()).select_from(entity.table).where(where)).scalar_one()
                )
                excluded = max(0, matching - count)
                new = lower if upper is None else upper
                conn.execute(forget)
                conn.execute(
                    _runs.insert().values(
                        **row,
                        mode=WATERMARK,
                        excluded=excluded,
                        attribute=attribute,
                        lower_bound="" if lower is None else canonical_text(lower),
                        watermark="" if new is None else canonical_text(new),
                    )
                )

        working_set = self.store.materialize(sandbox, run, activity, entity, select, then=record)
        if not recorded_here:
            # Built concurrently by another call: report what that build recorded.
            recorded = self._run_row(sandbox, run, activity)
            excluded = int(recorded["excluded"]) if recorded is not None else 0
        log.info("incremental working set built", run=run, activity=activity, excluded=excluded)
        return IncrementalBuild(working_set, excluded)

    def purge_processed_keys(self, now: dt.datetime | None = None) -> int:
        """Delete the processed keys recorded before ``now - window - retention`` of every processed-key
        table with a known, non-zero window; return how many were deleted."""
        moment = as_utc(now) or utcnow()
        with self.database.engine.connect() as conn:
            tables = conn.execute(
                sa.select(_key_tables.c.table_name, _key_tables.c.history_window_s).where(
                    _key_tables.c.history_window_s > 0
                )
            ).all()
        deleted = 0
        for table_name, window_s in tables:
            keep = dt.timedelta(seconds=int(window_s)) + self.store.retention
            if moment - dt.datetime.min.replace(tzinfo=dt.UTC) <= keep:
                continue
            table = sa.Table(table_name, sa.MetaData(), sa.Column("processed_time", sa.DateTime(timezone=True)))
            with self.database.engine.begin() as conn:
                result = conn.execution_options(preserve_rowcount=True).execute(
                    table.delete().where(table.c.processed_time < moment - keep)
                )
            if result.rowcount:
                log.info("processed keys purged", table=table_name, count=result.rowcount)
                deleted += result.rowcount
        return deleted

    def _check(self, entity: Entity, mode: IncrementalMode, field: str) -> str:
        """Check the mode against the dimension; the watermark attribute's type ("" for processed keys)."""
        if isinstance(mode, ProcessedKeys):
            if not dt.timedelta(0) <= mode.history_window <= MAX_HISTORY_WINDOW:
                raise InvalidArgument(
                    f"the history window must be between 0 and {MAX_HISTORY_WINDOW.days} days",
                    field=f"{field}.processed_keys.history_window",
                    reason="INVALID_INCREMENTAL",
                )
            return ""
        attribute = entity.schema.attribute(mode.attribute)
        if attribute is None or attribute.type not in WATERMARK_TYPES:
            raise InvalidArgument(
                f"the watermark needs a date or timestamp attribute of entity {entity.entity_id!r}",
                field=f"{field}.watermark.attribute",
                reason="INVALID_INCREMENTAL",
            )
        return attribute.type

    def _lower_bound(
        self,
        conn: sa.Connection,
        sandbox: str,
        run: str,
        activity: str,
        campaign: str,
        entity: Entity,
        mode: Watermark,
        attribute_type: str,
    ) -> Any:
        """The watermark a run starts from: the one it started from before (a rebuild), else the one the
        latest earlier run of the campaign activity left, else the initial one (None: no lower bound)."""
        own = (
            conn.execute(
                sa.select(_runs).where(_runs.c.sandbox == sandbox, _runs.c.run == run, _runs.c.activity == activity)
            )
            .mappings()
            .first()
        )
        text: str | None = None
        if own is not None and own["attribute"] == mode.attribute:
            text = own["lower_bound"]
        else:
            text = conn.execute(
                sa.select(_runs.c.watermark)
                .where(
                    _runs.c.sandbox == sandbox,
                    _runs.c.campaign == campaign,
                    _runs.c.activity == activity,
                    _runs.c.entity_id == entity.entity_id,
                    _runs.c.mode == WATERMARK,
                    _runs.c.attribute == mode.attribute,
                )
                .order_by(_runs.c.create_time.desc())
                .limit(1)
            ).scalar_one_or_none()
            if text is None and mode.initial is not None:
                initial = as_utc(mode.initial)
                assert initial is not None
                return initial.date() if attribute_type == "date" else initial
        if not text:
            return None
        if attribute_type == "date":
            return dt.date.fromisoformat(text)
        return dt.datetime.fromisoformat(text)

    def _key_table_name(self, sandbox: str, campaign: str, activity: str, entity: Entity) -> str:
        """The processed-key table of the campaign activity on ``entity``, created on first use."""
        where = (
            _key_tables.c.sandbox == sandbox,
            _key_tables.c.campaign == campaign,
            _key_tables.c.activity == activity,
            _key_tables.c.entity_id == entity.entity_id,
        )
        with self.database.engine.connect() as conn:
            found = conn.execute(sa.select(_key_tables.c.table_name).where(*where)).scalar_one_or_none()
        if found is not None:
            return str(found)
        table_name = f"pk_{uuid.uuid4().hex}"
        try:
            with self.database.engine.begin() as conn:
                # The catalog row first, so that SQLite's driver has begun the transaction before the DDL.
                conn.execute(
                    _key_tables.insert().values(
                        sandbox=sandbox,
                        campaign=campaign,
                        activity=activity,
                        entity_id=entity.entity_id,
                        table_name=table_name,
                        create_time=utcnow(),
                    )
                )
                processed_keys_table(table_name, entity).create(conn)
        except sa.exc.IntegrityError:
            # Created concurrently by another build of the same campaign activity.
            with self.database.engine.connect() as conn:
                return str(conn.execute(sa.select(_key_tables.c.table_name).where(*where)).scalar_one())
        return table_name

    def _run_row(self, sandbox: str, run: str, activity: str) -> sa.RowMapping | None:
        with self.database.engine.connect() as conn:
            return (
                conn.execute(
                    sa.select(_runs).where(_runs.c.sandbox == sandbox, _runs.c.run == run, _runs.c.activity == activity)
                )
                .mappings()
                .first()
            )
