"""Reconciliation: match the records of a working set to a target entity on attribute pairs.

Typically the working set holds loaded data (an imported file's rows, an entity used as incoming
data) and the target is a targeting dimension: each source record is matched to the target records
whose attributes equal its own, pair by pair (``email = email``, or ``first_name = first_name`` and
``birth_date = birth_date``). A source record then is

* **matched** when exactly one target record matches it,
* **unmatched** when none does (a NULL source attribute matches nothing; a source record deleted
  after the working set was built matches nothing either),
* **ambiguous** when several do: it is not reconciled, since picking one would be a guess.

The reconciled working set has the target dimension and holds each target record that is the only
match of at least one source record, once. The source records not reconciled (unmatched and
ambiguous) are dropped, counted, or kept in a working set of the source dimension. Each working set
is one ``INSERT … SELECT``; the counts come from one grouped statement (``COUNT`` of target matches
per source position). Both working sets, the counts and a reconciliation row (the
``reconciliations`` table) are written in one transaction. Reconciling the activity again returns the
recorded working sets and counts (not counts recomputed from the current data); an activity that
already holds another working set (another operation's, or a reconciliation of another source or
target) is FAILED_PRECONDITION (reason ``ACTIVITY_TAKEN``), and so is an unreconciled activity that
is already taken. A source working set purged during the call is NOT_FOUND.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from audience_svc.schema import compatible_types
from audience_svc.tables import ReconciliationRow, WorkingSetRow
from audience_svc.violations import invalid_argument
from audience_svc.working_sets import WorkingSet, WorkingSetStore, working_set_table
from carillon_chassis.database import utcnow
from carillon_chassis.errors import FailedPrecondition, FieldViolation, InvalidArgument
from carillon_chassis.names import parse_name, validate_id

log = structlog.get_logger("carillon.audience.reconciliation")

_rows: sa.Table = ReconciliationRow.__table__  # type: ignore[attr-defined]
_catalog: sa.Table = WorkingSetRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Reconciliation:
    """The reconciled working set, the kept unreconciled records (if asked for) and the counts."""

    working_set: WorkingSet
    unreconciled: WorkingSet | None
    matched: int
    unmatched: int
    ambiguous: int


def reconcile(
    store: WorkingSetStore,
    sandbox: str,
    run: str,
    activity: str,
    source_id: str,
    target_id: str,
    pairs: list[tuple[str, str]],
    *,
    unreconciled_activity: str = "",
) -> Reconciliation:
    """Reconcile working set ``source_id`` with entity ``target_id`` on ``pairs`` of (source attribute,
    target attribute); see the module documentation for what each count and working set holds."""
    parse_name(run, "campaigns", "runs", field="run")
    validate_id(activity, "activity")
    if unreconciled_activity:
        validate_id(unreconciled_activity, "unreconciled_activity")
        if unreconciled_activity == activity:
            raise InvalidArgument(
                "the unreconciled records need their own activity",
                field="unreconciled_activity",
                reason="INVALID_RECONCILIATION",
            )
    found = store.get(sandbox, source_id, field="working_set")
    source = store.catalog.get_entity(sandbox, found.entity_id, field="working_set")
    target = store.catalog.get_entity(sandbox, target_id, field="target")
    if not pairs:
        raise InvalidArgument(
            "reconcile on at least one pair of attributes", field="pairs", reason="INVALID_RECONCILIATION"
        )
    violations: list[FieldViolation] = []
    for i, (source_name, target_name) in enumerate(pairs):
        left = source.schema.attribute(source_name)
        right = target.schema.attribute(target_name)
        if left is None:
            violations.append(
                FieldViolation(
                    f"pairs[{i}].source_attribute", f"unknown attribute {source_name!r} of {source.entity_id!r}"
                )
            )
        if right is None:
            violations.append(
                FieldViolation(
                    f"pairs[{i}].target_attribute", f"unknown attribute {target_name!r} of {target.entity_id!r}"
                )
            )
        if left is not None and right is not None and not compatible_types(left, right):
            violations.append(
                FieldViolation(
                    f"pairs[{i}].target_attribute",
                    f"{target_name!r} ({right.type}) cannot be compared with {source_name!r} ({left.type})",
                )
            )
    if violations:
        raise invalid_argument("the reconciliation pairs are invalid", violations, "INVALID_RECONCILIATION")

    existing = store.find(sandbox, run, activity)
    if existing is not None:
        return _again(store, sandbox, run, activity, existing, source_id, target.entity_id, unreconciled_activity)
    if unreconciled_activity and store.find(sandbox, run, unreconciled_activity) is not None:
        raise FailedPrecondition(
            f"activity {unreconciled_activity!r} of run {run!r} already has a working set",
            field="unreconciled_activity",
            reason="ACTIVITY_TAKEN",
        )

    ws = working_set_table(store.table_name(sandbox, source_id), source)
    records = source.table.alias("src")
    linked = target.table.alias("dst")
    on_key = sa.and_(*[ws.c[f"k{i}"] == records.c[name] for i, name in enumerate(source.schema.primary_key, start=1)])
    on_pairs = sa.and_(*[records.c[s] == linked.c[t] for s, t in pairs])
    first_target_key = linked.c[target.schema.primary_key[0]]
    # Per source position, how many target records match (0 when the source record is gone).
    per_source = (
        sa.select(ws.c.position.label("position"), sa.func.count(first_target_key).label("matches"))
        .select_from(ws.outerjoin(records, on_key).outerjoin(linked, on_pairs))
        .group_by(ws.c.position)
        .subquery()
    )
    counts = sa.select(
        sa.func.coalesce(sa.func.sum(sa.case((per_source.c.matches == 1, 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((per_source.c.matches == 0, 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((per_source.c.matches > 1, 1), else_=0)), 0),
    )

    # The target records that are the only match of a source record, each once.
    target_keys = [linked.c[name] for name in target.schema.primary_key]
    target_names = [f"k{i}" for i in range(1, len(target_keys) + 1)]
    joined = (
        sa.select(
            *[c.label(n) for c, n in zip(target_keys, target_names, strict=True)],
            sa.func.count().over(partition_by=ws.c.position).label("matches"),
        )
        .select_from(ws.join(records, on_key).join(linked, on_pairs))
        .subquery()
    )
    reached = sa.select(*[joined.c[n] for n in target_names]).where(joined.c.matches == 1).distinct().subquery()
    selection: sa.Select[Any] = sa.select(
        sa.func.row_number().over(order_by=[reached.c[n] for n in target_names]).label("position"),
        *[reached.c[n] for n in target_names],
    )
    source_names = [f"k{i}" for i in range(1, len(source.schema.primary_key) + 1)]
    not_single = sa.select(per_source.c.position).where(per_source.c.matches != 1)
    rest = sa.select(
        sa.func.row_number().over(order_by=[ws.c[n] for n in source_names]).label("position"),
        *[ws.c[n] for n in source_names],
    ).where(ws.c.position.in_(not_single))

    built: list[tuple[WorkingSet | None, int, int, int]] = []

    def then(conn: sa.Connection, table: sa.Table, count: int) -> None:
        # In the reconciled working set's transaction: the counts, the kept working set and the
        # reconciliation row commit (or roll back) with it.
        matched, unmatched, ambiguous = (int(n) for n in conn.execute(counts).one())
        kept = (
            store.materialize_in(conn, sandbox, run, unreconciled_activity, source, rest)
            if unreconciled_activity
            else None
        )
        conn.execute(_rows.delete().where(_rows.c.sandbox == sandbox, _rows.c.run == run, _rows.c.activity == activity))
        conn.execute(
            _rows.insert().values(
                sandbox=sandbox,
                run=run,
                activity=activity,
                working_set_id=_table_working_set(conn, sandbox, table),
                source_working_set_id=source_id,
                target_entity_id=target.entity_id,
                unreconciled_activity=unreconciled_activity,
                unreconciled_working_set_id="" if kept is None else kept.working_set_id,
                matched=matched,
                unmatched=unmatched,
                ambiguous=ambiguous,
                create_time=utcnow(),
            )
        )
        built.append((kept, matched, unmatched, ambiguous))

    try:
        result = store.materialize(sandbox, run, activity, target, selection, then=then)
    except sa.exc.DBAPIError:
        # The source working set purged meanwhile (its table is gone): NOT_FOUND, not INTERNAL.
        store.get(sandbox, source_id, field="working_set")
        raise
    if not built:
        # Reconciled concurrently by another call: return what that call recorded.
        return _again(store, sandbox, run, activity, result, source_id, target.entity_id, unreconciled_activity)
    done = Reconciliation(result, *built[0])
    log.info(
        "working set reconciled",
        run=run,
        activity=activity,
        matched=done.matched,
        unmatched=done.unmatched,
        ambiguous=done.ambiguous,
    )
    return done


def _table_working_set(conn: sa.Connection, sandbox: str, table: sa.Table) -> str:
    """The id of the working set stored in ``table`` (its catalog row is in this transaction)."""
    return str(
        conn.execute(
            sa.select(_catalog.c.working_set_id).where(
                _catalog.c.sandbox == sandbox, _catalog.c.table_name == table.name
            )
        ).scalar_one()
    )


def _again(
    store: WorkingSetStore,
    sandbox: str,
    run: str,
    activity: str,
    existing: WorkingSet,
    source_id: str,
    target_id: str,
    unreconciled_activity: str,
) -> Reconciliation:
    """The reconciliation already recorded for ``run``'s ``activity`` (working sets and counts);
    FAILED_PRECONDITION when the activity holds another working set or another reconciliation."""
    with store.database.engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(_rows).where(_rows.c.sandbox == sandbox, _rows.c.run == run, _rows.c.activity == activity)
            )
            .mappings()
            .first()
        )
    if (
        row is None
        or row["working_set_id"] != existing.working_set_id
        or row["source_working_set_id"] != source_id
        or row["target_entity_id"] != target_id
        or existing.entity_id != target_id
    ):
        raise FailedPrecondition(
            f"activity {activity!r} of run {run!r} already has a working set that is not this reconciliation",
            field="activity",
            reason="ACTIVITY_TAKEN",
        )
    kept = None
    if unreconciled_activity:
        kept = store.find(sandbox, run, unreconciled_activity)
        if (
            row["unreconciled_activity"] != unreconciled_activity
            or kept is None
            or kept.working_set_id != row["unreconciled_working_set_id"]
        ):
            raise FailedPrecondition(
                f"activity {activity!r} of run {run!r} was reconciled without keeping the unreconciled records"
                f" in activity {unreconciled_activity!r}",
                field="unreconciled_activity",
                reason="ACTIVITY_TAKEN",
            )
    return Reconciliation(existing, kept, int(row["matched"]), int(row["unmatched"]), int(row["ambiguous"]))
