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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from audience_svc.coercion import CoercionError, RawValue, coerce_operand
from audience_svc.schema import STRING_TYPES, Entity
from audience_svc.violations import invalid_argument
from carillon_chassis.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class Condition:
    """A leaf: ``attribute operator values``."""

    attribute: str
    operator: str
    values: tuple[RawValue, ...] = ()


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


Filter = Condition | AllOf | AnyOf | Negate | EmptyFilter


@dataclass(frozen=True)
class AudienceQuery:
    """Which records of the dimension (an entity id) match the filter (None: every record)."""

    dimension: str
    filter: Filter | None = None


@dataclass(frozen=True)
class FilterLimits:
    """How deep a filter tree may nest (the root is at depth 1) and how many nodes it may hold."""

    max_depth: int = 32
    max_nodes: int = 1000


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
}
TEXT_OPERATORS = ("like", "starts_with", "contains")
ORDERING_OPERATORS = ("less", "less_or_equal", "greater", "greater_or_equal", "between")
LIKE_ESCAPE = "\\"


def compile_filter(
    entity: Entity, node: Filter | None, *, limits: FilterLimits | None = None, path: str = "query.filter"
) -> sa.ColumnElement[bool]:
    """The WHERE expression of ``node`` over ``entity``'s table; InvalidArgument lists every problem."""
    if node is None:
        return sa.true()
    check_limits(node, limits or FilterLimits(), path)
    violations: list[FieldViolation] = []
    expression = _Compiler(entity, violations).node(node, path)
    if violations or expression is None:
        raise invalid_argument(f"the filter has {len(violations)} problem(s)", violations, "INVALID_FILTER")
    return expression


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
        elif isinstance(current, Negate):
            stack.append((current.filter, depth + 1))


class _Compiler:
    """One compilation: walks the tree, collecting violations instead of stopping at the first."""

    def __init__(self, entity: Entity, violations: list[FieldViolation]) -> None:
        self.entity = entity
        self.table = entity.table
        self.violations = violations

    def bad(self, path: str, description: str) -> None:
        self.violations.append(FieldViolation(path, description))

    def node(self, node: Filter, path: str) -> sa.ColumnElement[bool] | None:
        if isinstance(node, Condition):
            return self.condition(node, f"{path}.condition")
        if isinstance(node, AllOf):
            parts = self.children(node.filters, f"{path}.all")
            return None if parts is None else sa.and_(*parts)
        if isinstance(node, AnyOf):
            parts = self.children(node.filters, f"{path}.any")
            return None if parts is None else sa.or_(*parts)
        if isinstance(node, Negate):
            inner = self.node(node.filter, f"{path}.negate")
            return None if inner is None else sa.not_(sa.func.coalesce(inner, sa.false()))
        self.bad(path, "exactly one of condition, all, any or negate must be set")
        return None

    def children(self, filters: Sequence[Filter], path: str) -> list[sa.ColumnElement[bool]] | None:
        if not filters:
            self.bad(f"{path}.filters", "a filter list needs at least one filter")
            return None
        parts = [self.node(child, f"{path}.filters[{i}]") for i, child in enumerate(filters)]
        compiled = [part for part in parts if part is not None]
        return compiled if len(compiled) == len(parts) else None

    def condition(self, condition: Condition, path: str) -> sa.ColumnElement[bool] | None:
        attribute = self.entity.schema.attribute(condition.attribute)
        if attribute is None:
            self.bad(
                f"{path}.attribute",
                f"unknown attribute {condition.attribute!r} of entity {self.entity.entity_id!r}",
            )
            return None
        operator = condition.operator
        arity = OPERATOR_ARITY.get(operator)
        if arity is None:
            self.bad(f"{path}.operator", "the operator must be set")
            return None
        if operator in TEXT_OPERATORS and attribute.type not in STRING_TYPES:
            self.bad(f"{path}.operator", f"{operator} applies to string and enum attributes only")
            return None
        if operator in ORDERING_OPERATORS and attribute.type == "boolean":
            self.bad(f"{path}.operator", f"{operator} does not apply to boolean attributes")
            return None
        low, high = arity
        count = len(condition.values)
        if count < low or (high is not None and count > high):
            expected = f"exactly {low}" if low == high else f"at least {low}"
            self.bad(f"{path}.values", f"{operator} takes {expected} value(s); got {count}")
            return None
        # A pattern or fragment of a string match is any string, even on an enum attribute.
        operand_type = "string" if operator in TEXT_OPERATORS else attribute.type
        values: list[Any] = []
        failed = False
        for j, raw in enumerate(condition.values):
            try:
                values.append(coerce_operand(operand_type, raw, attribute.enum_values))
            except CoercionError as exc:
                self.bad(f"{path}.values[{j}]", str(exc))
                failed = True
        if failed:
            return None
        return _comparison(self.table.c[attribute.name], operator, values)


def _comparison(column: sa.Column[Any], operator: str, values: list[Any]) -> sa.ColumnElement[bool]:
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
