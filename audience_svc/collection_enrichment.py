"""Collection enrichment: the first N records linked to each streamed row, by a sort.

A stream of a working set can add, under an alias, a list of the records reached from each row
through a one-to-many link (for example a customer's three next reservations), taken in a sort
order (NULLs last, then the linked records' key order), optionally only those matching a nested
filter, each carrying the chosen attributes. Delivery templates loop over it as ``target.<alias>``.

The list is fetched for a whole batch of rows in one statement, so memory is bounded by the batch
size times the limit (at most :data:`MAX_COLLECTION_LIMIT`) times the number of collections (at most
:data:`MAX_COLLECTIONS` per stream)::

    SELECT position, a0, a1, … FROM (
        SELECT ws.position, t.…, ROW_NUMBER() OVER (PARTITION BY ws.position ORDER BY sort…, t.key…) AS rank
        FROM ws JOIN entity ON key JOIN target AS t ON link WHERE position IN (batch) AND <filter>
    ) WHERE rank <= :limit ORDER BY position, rank

Window functions work the same on SQLite (3.25+) and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from audience_svc.coercion import from_database
from audience_svc.query import Bindings, EntityResolver, Filter, FilterLimits, compile_filter, join_condition
from audience_svc.schema import ONE_TO_MANY, Attribute, Entity, Link, checked_link_target
from audience_svc.violations import invalid_argument
from carillon_chassis.errors import FieldViolation
from carillon_chassis.values import PyValue

MAX_COLLECTION_LIMIT = 100
# The most collections one stream may request.
MAX_COLLECTIONS = 10


@dataclass(frozen=True)
class Collection:
    """A requested collection: up to ``limit`` records reached through ``link`` that match ``filter``,
    first by ``order_by`` ((attribute, descending) pairs), each with ``attributes`` (empty: all),
    under ``alias``."""

    alias: str
    link: str
    limit: int
    order_by: tuple[tuple[str, bool], ...] = ()
    attributes: tuple[str, ...] = ()
    filter: Filter | None = None


@dataclass(frozen=True)
class CollectionPlan:
    """A checked collection: its link and target entity, attributes, sort, limit and compiled filter."""

    alias: str
    link: Link
    target: Entity
    limit: int
    attributes: tuple[Attribute, ...]
    order_by: tuple[tuple[str, bool], ...]
    where: sa.ColumnElement[bool]

    def values_of(self, row: Sequence[Any]) -> dict[str, PyValue]:
        """One linked record's values by attribute name, from the attribute columns of a fetched row."""
        return {a.name: from_database(a.type, v) for a, v in zip(self.attributes, row, strict=True)}


def plan_collection(
    entity: Entity,
    collection: Collection,
    *,
    limits: FilterLimits,
    path: str,
    resolve: EntityResolver,
    bindings: Bindings | None = None,
) -> CollectionPlan:
    """Check a collection of ``entity``'s rows; InvalidArgument (INVALID_ENRICHMENT) lists every problem,
    each naming its field under ``path``, except the nested filter's, which come as INVALID_FILTER."""
    violations: list[FieldViolation] = []
    link = entity.schema.link(collection.link)
    target = None if link is None else checked_link_target(link, resolve(link.target))
    if link is None or target is None or link.cardinality != ONE_TO_MANY:
        violations.append(
            FieldViolation(f"{path}.link", f"{collection.link!r} is not a one-to-many link of {entity.entity_id!r}")
        )
    if not 1 <= collection.limit <= MAX_COLLECTION_LIMIT:
        violations.append(FieldViolation(f"{path}.limit", f"the limit must be between 1 and {MAX_COLLECTION_LIMIT}"))
    attributes: list[Attribute] = []
    if target is not None:
        for j, (name, _) in enumerate(collection.order_by):
            if target.schema.attribute(name) is None:
                violations.append(
                    FieldViolation(
                        f"{path}.order_by[{j}].attribute", f"unknown attribute {name!r} of {target.entity_id!r}"
                    )
                )
        for j, name in enumerate(collection.attributes):
            attribute = target.schema.attribute(name)
            if attribute is None:
                violations.append(
                    FieldViolation(f"{path}.attributes[{j}]", f"unknown attribute {name!r} of {target.entity_id!r}")
                )
            elif attribute not in attributes:
                attributes.append(attribute)
        if not collection.attributes:
            attributes = list(target.schema.attributes)
    if violations:
        raise invalid_argument("the collection enrichment is invalid", violations, "INVALID_ENRICHMENT")
    assert link is not None and target is not None
    where = compile_filter(
        target, collection.filter, limits=limits, path=f"{path}.filter", resolve=resolve, bindings=bindings
    )
    return CollectionPlan(
        alias=collection.alias,
        link=link,
        target=target,
        limit=collection.limit,
        attributes=tuple(attributes),
        order_by=collection.order_by,
        where=where,
    )


def collection_statement(
    plan: CollectionPlan, entity: Entity, working_set: sa.Table, after_position: int, last_position: int
) -> sa.Select[Any]:
    """The statement fetching the collection of the rows at positions ``(after_position, last_position]``:
    rows of (position, attribute values…) in position order, then the collection's order."""
    records = entity.table.alias("rec")
    # The filter was compiled over the target's own table, so that table is used unaliased here.
    linked = plan.target.table
    on_key = sa.and_(
        *[working_set.c[f"k{i}"] == records.c[name] for i, name in enumerate(entity.schema.primary_key, start=1)]
    )
    order = [
        (linked.c[name].desc() if descending else linked.c[name].asc()).nulls_last()
        for name, descending in plan.order_by
    ]
    ranked = (
        sa.select(
            working_set.c.position.label("position"),
            *[linked.c[a.name].label(f"a{i}") for i, a in enumerate(plan.attributes)],
            sa.func.row_number()
            .over(partition_by=working_set.c.position, order_by=[*order, *plan.target.key_columns()])
            .label("rank"),
        )
        .select_from(working_set.join(records, on_key).join(linked, join_condition(plan.link, records, linked)))
        .where(working_set.c.position > after_position, working_set.c.position <= last_position, plan.where)
        .subquery()
    )
    return (
        sa.select(ranked.c.position, *[ranked.c[f"a{i}"] for i in range(len(plan.attributes))])
        .where(ranked.c.rank <= plan.limit)
        .order_by(ranked.c.position, ranked.c.rank)
    )
