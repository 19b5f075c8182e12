"""The filter compiler: an audience query's filter tree → one SQLAlchemy Core boolean expression.

A filter is a tree of :class:`Condition` leaves joined by :class:`AllOf` (AND), :class:`AnyOf` (OR)
and :class:`Negate` (NOT). Compilation resolves every attribute against the dimension's schema,
checks each operator's arity and the attribute types it applies to, coerces every operand to the
attribute's type and passes it to the database only as a bound parameter: no text of the request
ever becomes SQL. All problems of a tree are reported together, each naming its field path from the
request root (``query.filter.all.filters[1].condition.attribute``). The tree's depth and node count
are limited (:class:`FilterLimits`).

Semantics worth knowing:

* ``not_equal`` and ``not_in`` follow SQL: a NULL attribute matches neither ``= x`` nor ``<> x``.
* ``negate`` is the complement of its filter: it matches exactly the records the filter does not
  match, including those where the filter is unknown because of a NULL (``NOT COALESCE(f, FALSE)``).
  So ``negate(country = 'SE')`` matches records without a country, while ``country <> 'SE'`` does not.
* ``like``, ``starts_with`` and ``contains`` apply to string and enum attributes and compare without
  regard to case, identically on SQLite and PostgreSQL (``ILIKE`` on PostgreSQL, ``lower() LIKE
  lower()`` on SQLite, which folds ASCII letters only). ``like`` takes a pattern with ``%`` and ``_``
  wildcards and ``\\`` as escape character; ``starts_with`` and ``contains`` match their value
  literally (wildcards in it are escaped).
* ``between`` includes both bounds; ordering operators do not apply to boolean attributes.
* A dot path (``hotel.chain.name``) follows many-to-one links; each hop compiles to
  ``EXISTS (SELECT 1 FROM target AS alias WHERE join AND …)``, so a record without a linked
  record matches no condition on the linked attributes, except ``is_null`` (compiled as the
  complement of ``is_not_null``). A one-to-many link in a dot path is refused: link conditions
  (:class:`LinkCondition`) test those, as correlated ``EXISTS`` or scalar subqueries (``count`` of
  no records is 0; ``sum``/``avg``/``min``/``max`` of none are NULL and match no comparison).
* ``within_last_days`` / ``within_next_days`` compare with the reference time of the
  :class:`Bindings` (default: now): ``[ref - N days, ref]`` / ``[ref, ref + N days]``, both ends
  included; date attributes compare with the reference time's UTC date.
* A condition may take its operands from a named parameter bound at execution
  (:class:`Bindings`); its values are coerced and bound like literal ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from audience_svc.coercion import CoercionError, RawValue, coerce_operand
from audience_svc.schema import ONE_TO_MANY, STRING_TYPES, Attribute, Entity, Link, checked_link_target
from audience_svc.violations import invalid_argument
from carillon_chassis.database import as_utc, utcnow
from carillon_chassis.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class Condition:
    """A leaf: ``attribute operator values``.

    ``attribute`` is an attribute of the entity or a dot path through many-to-one links to an
    attribute of a linked entity (``hotel.city``, ``hotel.chain.name``). The operands are ``values``
    or, when ``parameter`` is set, the values bound to that named parameter at execution.
    """

    attribute: str
    operator: str
    values: tuple[RawValue, ...] = ()
    parameter: str = ""


@dataclass(frozen=True)
class LinkCondition:
    """A condition on the records reached through a link (usually one-to-many).

    ``link`` is a link name, optionally after a dot path of many-to-one links (``customer.bookings``).
    ``measure`` is ``exists`` or ``not_exists`` (no operator, no values), ``count``, or an aggregate
    (``sum``, ``avg``, ``min``, ``max``) of ``attribute`` of the linked records, compared with
    ``operator`` to ``values`` (or to a named ``parameter``). Only linked records matching
    ``filter`` (all of them when it is None) are considered.
    """

    link: str
    measure: str
    attribute: str = ""
    operator: str = ""
    values: tuple[RawValue, ...] = ()
    parameter: str = ""
    filter: Filter | None = None


@dataclass(frozen=True)
class AllOf:
    """Every filter must match (AND)."""

    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class AnyOf:
    """At least one filter must match (OR)."""

    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Negate:
    """The filter must not match (NOT, as a complement)."""

    filter: Filter


@dataclass(frozen=True)
class EmptyFilter:
    """A filter node with none of its kinds set: always a violation."""


Filter = Condition | LinkCondition | AllOf | AnyOf | Negate | EmptyFilter


@dataclass(frozen=True)
class AudienceQuery:
    """Which records of the dimension (an entity id) match the filter (None: every record)."""

    dimension: str
    filter: Filter | None = None


@dataclass(frozen=True)
class Bindings:
    """What a query is executed with: the reference time of relative dates and parameter values."""

    reference_time: dt.datetime | None = None
    parameters: Mapping[str, tuple[RawValue, ...]] = field(default_factory=dict)
    # Only check the query: a parameter without a value is not an error (saving a definition).
    allow_unbound: bool = False


@dataclass(frozen=True)
class FilterLimits:
    """How deep a filter tree may nest (the root is at depth 1), how many nodes it may hold, and how
    many links one dot path may go through."""

    max_depth: int = 32
    max_nodes: int = 1000
    max_path_links: int = 4


# Operator → (minimum, maximum) number of values; None: no maximum.
OPERATOR_ARITY: dict[str, tuple[int, int | None]] = {
    "equal": (1, 1),
    "not_equal": (1, 1),
    "less": (1, 1),
    "less_or_equal": (1, 1),
    "greater": (1, 1),
    "greater_or_equal": (1, 1),
    "in": (1, None),
    "not_in": (1, None),
    "is_null": (0, 0),
    "is_not_null": (0, 0),
    "like": (1, 1),
    "starts_with": (1, 1),
    "contains": (1, 1),
    "between": (2, 2),
    "within_last_days": (1, 1),
    "within_next_days": (1, 1),
}
TEXT_OPERATORS = ("like", "starts_with", "contains")
ORDERING_OPERATORS = ("less", "less_or_equal", "greater", "greater_or_equal", "between")
RELATIVE_DATE_OPERATORS = ("within_last_days", "within_next_days")
# The operators that compare a count or an aggregate of linked records with values.
MEASURE_OPERATORS = (
    "equal",
    "not_equal",
    "less",
    "less_or_equal",
    "greater",
    "greater_or_equal",
    "in",
    "not_in",
    "between",
)
EXISTENCE_MEASURES = ("exists", "not_exists")
AGGREGATES = ("sum", "avg", "min", "max")
MEASURES = (*EXISTENCE_MEASURES, "count", *AGGREGATES)
# Attribute types each aggregate applies to.
AGGREGATE_TYPES: dict[str, tuple[str, ...]] = {
    "sum": ("integer", "decimal"),
    "avg": ("integer", "decimal"),
    "min": ("integer", "decimal", "date", "timestamp"),
    "max": ("integer", "decimal", "date", "timestamp"),
}
MAX_RELATIVE_DAYS = 100_000
LIKE_ESCAPE = "\\"

EntityResolver = Callable[[str], "Entity | None"]


def compile_filter(
    entity: Entity,
    node: Filter | None,
    *,
    limits: FilterLimits | None = None,
    path: str = "query.filter",
    resolve: EntityResolver | None = None,
    bindings: Bindings | None = None,
) -> sa.ColumnElement[bool]:
    """The WHERE expression of ``node`` over ``entity``'s table; InvalidArgument lists every problem.

    ``resolve`` finds linked entities by id (without it no link can be followed); ``bindings``
    gives the reference time of relative dates (default: now) and the values of named parameters.
    """
    if node is None:
        return sa.true()
    limits = limits or FilterLimits()
    check_limits(node, limits, path)
    bound = bindings or Bindings()
    context = _Context(
        resolve=resolve or (lambda _: None),
        limits=limits,
        reference=as_utc(bound.reference_time) or utcnow(),
        parameters=bound.parameters,
        violations=[],
        allow_unbound=bound.allow_unbound,
    )
    expression = _Compiler(entity, entity.table, context).node(node, path)
    if context.violations or (expression is None and not bound.allow_unbound):
        raise invalid_argument(
            f"the filter has {len(context.violations)} problem(s)", context.violations, "INVALID_FILTER"
        )
    # Only a check with unbound parameters leaves a part uncompiled without a violation.
    return sa.false() if expression is None else expression


@dataclass(frozen=True)
class Aggregate:
    """An enrichment column: ``measure`` (count, sum, avg, min, max) of the records reached through
    ``link`` that match ``filter``, under ``alias``; ``attribute`` is the aggregated attribute."""

    alias: str
    link: str
    measure: str
    attribute: str = ""
    filter: Filter | None = None


def compile_aggregate(
    entity: Entity,
    aggregate: Aggregate,
    *,
    limits: FilterLimits | None = None,
    path: str = "aggregate",
    resolve: EntityResolver | None = None,
    bindings: Bindings | None = None,
) -> tuple[sa.ColumnElement[Any], str]:
    """A correlated scalar subquery over ``entity``'s table, and the attribute type of its value.

    A count over no linked records is 0; the other aggregates are NULL then.
    """
    limits = limits or FilterLimits()
    if aggregate.filter is not None:
        check_limits(aggregate.filter, limits, f"{path}.filter")
    bound = bindings or Bindings()
    context = _Context(
        resolve=resolve or (lambda _: None),
        limits=limits,
        reference=as_utc(bound.reference_time) or utcnow(),
        parameters=bound.parameters,
        violations=[],
    )
    compiler = _Compiler(entity, entity.table, context)
    result: tuple[sa.ColumnElement[Any], str] | None = None
    link = entity.schema.link(aggregate.link)
    target = None if link is None else checked_link_target(link, context.resolve(link.target))
    if link is None or target is None:
        compiler.bad(f"{path}.link", f"unknown link {aggregate.link!r} of entity {entity.entity_id!r}")
    elif aggregate.measure not in ("count", *AGGREGATES):
        compiler.bad(f"{path}.measure", "the measure must be COUNT, SUM, AVG, MIN or MAX")
    else:
        linked = target.table.alias()
        nested: sa.ColumnElement[bool] | None = sa.true()
        if aggregate.filter is not None:
            nested = _Compiler(target, linked, context).node(aggregate.filter, f"{path}.filter")
        attribute = target.schema.attribute(aggregate.attribute)
        value: sa.ColumnElement[Any] | None = None
        value_type = "integer"
        if aggregate.measure == "count":
            value = sa.func.count()
        elif attribute is None or attribute.type not in AGGREGATE_TYPES[aggregate.measure]:
            compiler.bad(
                f"{path}.attribute",
                f"{aggregate.measure} needs an attribute of entity {target.entity_id!r} of type "
                f"{' or '.join(AGGREGATE_TYPES[aggregate.measure])}",
            )
        else:
            value = getattr(sa.func, aggregate.measure)(linked.c[attribute.name])
            value_type = "decimal" if aggregate.measure == "avg" else attribute.type
        if value is not None and nested is not None:
            scalar = (
                sa.select(value)
                .select_from(linked)
                .where(join_condition(link, entity.table, linked), nested)
                .correlate_except(linked)
                .scalar_subquery()
            )
            result = (scalar, value_type)
    if context.violations or result is None:
        raise invalid_argument(
            f"the enrichment has {len(context.violations)} problem(s)", context.violations, "INVALID_ENRICHMENT"
        )
    return result


def check_limits(node: Filter, limits: FilterLimits, path: str = "query.filter") -> None:
    """Raise InvalidArgument naming the limit when the tree is too deep or has too many nodes."""
    nodes = 0
    stack: list[tuple[Filter, int]] = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise InvalidArgument(
                f"the filter has more than {limits.max_nodes} nodes (max_filter_nodes)",
                field=path,
                reason="FILTER_TOO_LARGE",
                metadata={"limit": "max_filter_nodes", "value": str(limits.max_nodes)},
            )
        if depth > limits.max_depth:
            raise InvalidArgument(
                f"the filter nests deeper than {limits.max_depth} levels (max_filter_depth)",
                field=path,
                reason="FILTER_TOO_DEEP",
                metadata={"limit": "max_filter_depth", "value": str(limits.max_depth)},
            )
        if isinstance(current, AllOf | AnyOf):
            stack.extend((child, depth + 1) for child in current.filters)
        elif isinstance(current, Negate | LinkCondition) and current.filter is not None:
            stack.append((current.filter, depth + 1))


@dataclass
class _Context:
    """What every compiler of one compilation shares: lookups, limits, bindings and violations."""

    resolve: EntityResolver
    limits: FilterLimits
    reference: dt.datetime
    parameters: Mapping[str, tuple[RawValue, ...]]
    violations: list[FieldViolation]
    allow_unbound: bool = False


@dataclass(frozen=True)
class _Hop:
    """One many-to-one step of a dot path: from ``outer`` through ``link`` to ``inner`` (an alias)."""

    link: Link
    outer: sa.FromClause
    inner: sa.FromClause


class _Compiler:
    """Compiles filters over one entity, read from ``table`` (its table or an alias of it).

    Walks the tree, collecting violations instead of stopping at the first. Linked records are read
    through fresh aliases in correlated subqueries, so one statement holds the whole filter.
    """

    def __init__(self, entity: Entity, table: sa.FromClause, context: _Context) -> None:
        self.entity = entity
        self.table = table
        self.context = context

    def bad(self, path: str, description: str) -> None:
        self.context.violations.append(FieldViolation(path, description))

    def node(self, node: Filter, path: str) -> sa.ColumnElement[bool] | None:
        if isinstance(node, Condition):
            return self.condition(node, f"{path}.condition")
        if isinstance(node, LinkCondition):
            return self.link_condition(node, f"{path}.link")
        if isinstance(node, AllOf):
            parts = self.children(node.filters, f"{path}.all")
            return None if parts is None else sa.and_(*parts)
        if isinstance(node, AnyOf):
            parts = self.children(node.filters, f"{path}.any")
            return None if parts is None else sa.or_(*parts)
        if isinstance(node, Negate):
            inner = self.node(node.filter, f"{path}.negate")
            return None if inner is None else sa.not_(sa.func.coalesce(inner, sa.false()))
        self.bad(path, "exactly one of condition, link, all, any or negate must be set")
        return None

    def children(self, filters: Sequence[Filter], path: str) -> list[sa.ColumnElement[bool]] | None:
        if not filters:
            self.bad(f"{path}.filters", "a filter list needs at least one filter")
            return None
        parts = [self.node(child, f"{path}.filters[{i}]") for i, child in enumerate(filters)]
        compiled = [part for part in parts if part is not None]
        return compiled if len(compiled) == len(parts) else None

    def walk(self, names: Sequence[str], path: str, full: str) -> tuple[Entity, sa.FromClause, list[_Hop]] | None:
        """Follow many-to-one links ``names`` from this entity; None (with a violation) when one fails."""
        if len(names) > self.context.limits.max_path_links:
            self.bad(
                path,
                f"{full!r} goes through {len(names)} links; at most {self.context.limits.max_path_links} "
                "are allowed (max_path_links)",
            )
            return None
        entity, table = self.entity, self.table
        hops: list[_Hop] = []
        for name in names:
            link = entity.schema.link(name)
            if link is None:
                kind = "an attribute, not a link," if entity.schema.attribute(name) else "not a link"
                self.bad(path, f"in {full!r}, {name!r} is {kind} of entity {entity.entity_id!r}")
                return None
            if link.cardinality == ONE_TO_MANY:
                self.bad(
                    path,
                    f"in {full!r}, {name!r} is a one-to-many link of entity {entity.entity_id!r}: a dot path "
                    "follows many-to-one links only; use a link condition (exists, count or an aggregate)",
                )
                return None
            target = self.context.resolve(link.target)
            if target is None:
                self.bad(path, f"in {full!r}, the target {link.target!r} of link {name!r} does not exist")
                return None
            inner = target.table.alias()
            hops.append(_Hop(link, table, inner))
            entity, table = target, inner
        return entity, table, hops

    def operands(
        self, values: tuple[RawValue, ...], parameter: str, path: str
    ) -> tuple[tuple[RawValue, ...], str] | None:
        """The raw operands of a condition and the field path of their list; None when the parameter is unbound."""
        if not parameter:
            return values, f"{path}.values"
        if values:
            self.bad(f"{path}.parameter", "set either values or a parameter, not both")
            return None
        bound = self.context.parameters.get(parameter)
        if bound is None and self.context.allow_unbound:
            return None
        if bound is None:
            self.bad(f"{path}.parameter", f"no value is bound to parameter {parameter!r}")
            return None
        return bound, f"{path}.parameter"

    def coerce(
        self, operand_type: str, raws: tuple[RawValue, ...], list_path: str, enum_values: tuple[str, ...] = ()
    ) -> list[Any] | None:
        values: list[Any] = []
        failed = False
        for j, raw in enumerate(raws):
            try:
                values.append(coerce_operand(operand_type, raw, enum_values))
            except CoercionError as exc:
                self.bad(f"{list_path}[{j}]", str(exc))
                failed = True
        return None if failed else values

    def arity_ok(self, operator: str, count: int, list_path: str) -> bool:
        low, high = OPERATOR_ARITY[operator]
        if count < low or (high is not None and count > high):
            expected = f"exactly {low}" if low == high else f"at least {low}"
            self.bad(list_path, f"{operator} takes {expected} value(s); got {count}")
            return False
        return True

    def condition(self, condition: Condition, path: str) -> sa.ColumnElement[bool] | None:
        *link_names, name = condition.attribute.split(".")
        walked = self.walk(link_names, f"{path}.attribute", condition.attribute)
        if walked is None:
            return None
        entity, table, hops = walked
        attribute = entity.schema.attribute(name)
        if attribute is None:
            self.bad(f"{path}.attribute", f"unknown attribute {name!r} of entity {entity.entity_id!r}")
            return None
        operator = condition.operator
        if operator not in OPERATOR_ARITY:
            self.bad(f"{path}.operator", "the operator must be set")
            return None
        if operator in TEXT_OPERATORS and attribute.type not in STRING_TYPES:
            self.bad(f"{path}.operator", f"{operator} applies to string and enum attributes only")
            return None
        if operator in ORDERING_OPERATORS and attribute.type == "boolean":
            self.bad(f"{path}.operator", f"{operator} does not apply to boolean attributes")
            return None
        if operator in RELATIVE_DATE_OPERATORS and attribute.type not in ("date", "timestamp"):
            self.bad(f"{path}.operator", f"{operator} applies to date and timestamp attributes only")
            return None
        # A pattern or fragment of a string match is any string, even on an enum attribute.
        if operator in TEXT_OPERATORS:
            operand_type = "string"
        elif operator in RELATIVE_DATE_OPERATORS:
            operand_type = "integer"
        else:
            operand_type = attribute.type
        coerced = self.operand_values(condition.values, condition.parameter, path, operator, operand_type, attribute)
        if coerced is None:
            return None
        values, list_path = coerced
        column = table.c[attribute.name]
        if operator in RELATIVE_DATE_OPERATORS:
            days = values[0]
            if not 0 <= days <= MAX_RELATIVE_DAYS:
                self.bad(f"{list_path}[0]", f"the number of days must be between 0 and {MAX_RELATIVE_DAYS}")
                return None
            operator, values = "between", self.relative_bounds(operator, days, attribute.type)
        if operator == "is_null" and hops:
            # Null when the linked attribute is null or when there is no linked record at all.
            return sa.not_(_through(hops, column.is_not(None)))
        return _through(hops, _comparison(column, operator, values))

    def relative_bounds(self, operator: str, days: int, attribute_type: str) -> list[Any]:
        """The inclusive bounds of "within the last/next ``days`` days" of the reference time."""
        reference: dt.datetime | dt.date = self.context.reference
        if attribute_type == "date":
            reference = self.context.reference.date()
        span = dt.timedelta(days=days)
        if operator == "within_last_days":
            return [reference - span, reference]
        return [reference, reference + span]

    def link_condition(self, condition: LinkCondition, path: str) -> sa.ColumnElement[bool] | None:
        *hop_names, last = condition.link.split(".")
        walked = self.walk(hop_names, f"{path}.link", condition.link)
        if walked is None:
            return None
        entity, table, hops = walked
        link = entity.schema.link(last)
        if link is None:
            self.bad(f"{path}.link", f"unknown link {last!r} of entity {entity.entity_id!r}")
            return None
        target = checked_link_target(link, self.context.resolve(link.target))
        if target is None:
            self.bad(f"{path}.link", f"the target {link.target!r} of link {last!r} does not exist")
            return None
        if len(hop_names) + 1 > self.context.limits.max_path_links:
            self.bad(
                f"{path}.link", f"{condition.link!r} goes through more than {self.context.limits.max_path_links} links"
            )
            return None
        linked = target.table.alias()
        nested: sa.ColumnElement[bool] | None = sa.true()
        if condition.filter is not None:
            nested = _Compiler(target, linked, self.context).node(condition.filter, f"{path}.filter")
        measured = self.measure(condition, target, linked, path)
        if nested is None or measured is None:
            return None
        join = join_condition(link, table, linked)
        if condition.measure in EXISTENCE_MEASURES:
            found = sa.select(sa.literal(1)).select_from(linked).where(join, nested).correlate_except(linked).exists()
            if condition.measure == "exists":
                return _through(hops, found)
            return sa.not_(_through(hops, found))
        aggregate, operator, values = measured
        scalar = sa.select(aggregate).select_from(linked).where(join, nested).correlate_except(linked).scalar_subquery()
        return _through(hops, _comparison(scalar, operator, values))

    def measure(
        self, condition: LinkCondition, target: Entity, linked: sa.FromClause, path: str
    ) -> tuple[sa.ColumnElement[Any], str, list[Any]] | None:
        """The aggregate, operator and coerced values of a count or aggregate condition."""
        measure = condition.measure
        if measure not in MEASURES:
            self.bad(f"{path}.measure", "the measure must be set")
            return None
        if measure in EXISTENCE_MEASURES:
            if condition.operator or condition.values or condition.parameter or condition.attribute:
                self.bad(f"{path}.measure", f"{measure} takes no attribute, operator, values or parameter")
                return None
            return sa.literal(1), "", []
        if measure == "count":
            if condition.attribute:
                self.bad(f"{path}.attribute", "count takes no attribute: it counts the linked records")
                return None
            aggregate: sa.ColumnElement[Any] = sa.func.count()
            operand_type = "integer"
        else:
            attribute = target.schema.attribute(condition.attribute)
            if attribute is None:
                self.bad(
                    f"{path}.attribute",
                    f"{measure} needs an attribute of entity {target.entity_id!r}; {condition.attribute!r} is not one",
                )
                return None
            if attribute.type not in AGGREGATE_TYPES[measure]:
                self.bad(f"{path}.attribute", f"{measure} does not apply to {attribute.type} attributes")
                return None
            column = linked.c[attribute.name]
            aggregate = getattr(sa.func, measure)(column)
            operand_type = "decimal" if measure == "avg" else attribute.type
        operator = condition.operator
        if operator not in MEASURE_OPERATORS:
            self.bad(f"{path}.operator", f"{measure} is compared with one of {', '.join(MEASURE_OPERATORS)}")
            return None
        coerced = self.operand_values(condition.values, condition.parameter, path, operator, operand_type)
        if coerced is None:
            return None
        return aggregate, operator, coerced[0]

    def operand_values(
        self,
        given: tuple[RawValue, ...],
        parameter: str,
        path: str,
        operator: str,
        operand_type: str,
        attribute: Attribute | None = None,
    ) -> tuple[list[Any], str] | None:
        """The operands of a comparison (given values or a bound parameter), checked for the operator's
        arity and coerced to ``operand_type`` (an enum ``attribute`` limits them to its values); with the
        field path of the list for later errors. None (with the problem recorded) when they do not fit."""
        found = self.operands(given, parameter, path)
        if found is None:
            return None
        raws, list_path = found
        if not self.arity_ok(operator, len(raws), list_path):
            return None
        values = self.coerce(operand_type, raws, list_path, attribute.enum_values if attribute is not None else ())
        if values is None:
            return None
        return values, list_path


def join_condition(link: Link, outer: sa.FromClause, inner: sa.FromClause) -> sa.ColumnElement[bool]:
    """The join condition of ``link`` from ``outer`` to ``inner``.

    A built-in link (one with ``target_values``) also binds its fixed target values, and compares a
    non-string local attribute as text (message logs hold identities as text; the built-in link
    exists only for identity types whose SQL text is their canonical text, see
    :data:`audience_svc.schema.MESSAGE_LOG_IDENTITY_TYPES`).
    """
    parts: list[sa.ColumnElement[bool]] = []
    for pair in link.join:
        local: sa.ColumnElement[Any] = outer.c[pair.attribute]
        if link.target_values and not isinstance(local.type, sa.String):
            local = sa.cast(local, sa.Text)
        parts.append(local == inner.c[pair.target_attribute])
    parts += [inner.c[name] == value for name, value in link.target_values]
    return sa.and_(*parts)


def _through(hops: Sequence[_Hop], expression: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """``expression`` (over the last hop's alias) as seen from the first hop's outer table.

    Each many-to-one hop becomes ``EXISTS (SELECT 1 FROM target AS t WHERE join AND …)``: true when
    the linked record exists and matches. A missing linked record therefore matches no condition
    (except ``is_null``, which the caller handles as the complement of ``is_not_null``).
    """
    for hop in reversed(hops):
        expression = (
            sa.select(sa.literal(1))
            .select_from(hop.inner)
            .where(join_condition(hop.link, hop.outer, hop.inner), expression)
            .correlate_except(hop.inner)
            .exists()
        )
    return expression


def _comparison(column: sa.ColumnElement[Any], operator: str, values: list[Any]) -> sa.ColumnElement[bool]:
    """The SQL comparison of one condition; every value becomes a bound parameter."""
    expression: sa.ColumnElement[bool]
    if operator == "equal":
        expression = column == values[0]
    elif operator == "not_equal":
        expression = column != values[0]
    elif operator == "less":
        expression = column < values[0]
    elif operator == "less_or_equal":
        expression = column <= values[0]
    elif operator == "greater":
        expression = column > values[0]
    elif operator == "greater_or_equal":
        expression = column >= values[0]
    elif operator == "in":
        expression = column.in_(values)
    elif operator == "not_in":
        expression = column.not_in(values)
    elif operator == "is_null":
        expression = column.is_(None)
    elif operator == "is_not_null":
        expression = column.is_not(None)
    elif operator == "like":
        expression = column.ilike(values[0], escape=LIKE_ESCAPE)
    elif operator == "starts_with":
        expression = column.istartswith(values[0], autoescape=True)
    elif operator == "contains":
        expression = column.icontains(values[0], autoescape=True)
    elif operator == "between":
        expression = column.between(values[0], values[1])
    else:
        raise AssertionError(f"unhandled operator {operator!r}")
    return expression
