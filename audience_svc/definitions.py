"""The JSON form of audience queries, as stored in saved audiences (definitions evaluated when read).

Every value keeps its kind (``["date", "2024-01-31"]``), so a stored query compiles exactly as the
one that was saved. Only queries that compiled (apart from unbound parameters) are stored, so no
:class:`~audience_svc.coercion.Malformed` value ever reaches this module.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

from audience_svc.coercion import Malformed, RawValue
from audience_svc.query import AllOf, AnyOf, AudienceQuery, Condition, EmptyFilter, Filter, LinkCondition, Negate


def query_to_json(query: AudienceQuery) -> str:
    """The JSON text of a query."""
    return json.dumps(
        {"dimension": query.dimension, "filter": None if query.filter is None else _filter(query.filter)},
        separators=(",", ":"),
    )


def query_from_json(text: str) -> AudienceQuery:
    """The query stored by :func:`query_to_json`."""
    data = json.loads(text)
    return AudienceQuery(data["dimension"], None if data["filter"] is None else _filter_of(data["filter"]))


def _value(value: RawValue) -> list[Any]:
    if isinstance(value, Malformed):
        raise ValueError("malformed values are never stored")
    if value is None:
        return ["null", None]
    if isinstance(value, bool):
        return ["boolean", value]
    if isinstance(value, int):
        return ["integer", value]
    if isinstance(value, Decimal):
        return ["decimal", format(value, "f")]
    if isinstance(value, dt.datetime):
        return ["timestamp", value.isoformat()]
    if isinstance(value, dt.date):
        return ["date", value.isoformat()]
    return ["string", value]


def _value_of(item: list[Any]) -> RawValue:
    kind, data = item
    if kind == "decimal":
        return Decimal(data)
    if kind == "timestamp":
        return dt.datetime.fromisoformat(data)
    if kind == "date":
        return dt.date.fromisoformat(data)
    if kind in ("null", "boolean", "integer", "string"):
        value: RawValue = data
        return value
    raise ValueError(f"unknown stored value kind {kind!r}")


def _filter(node: Filter) -> dict[str, Any]:
    if isinstance(node, Condition):
        return {
            "condition": {
                "attribute": node.attribute,
                "operator": node.operator,
                "values": [_value(v) for v in node.values],
                "parameter": node.parameter,
            }
        }
    if isinstance(node, LinkCondition):
        return {
            "link": {
                "link": node.link,
                "measure": node.measure,
                "attribute": node.attribute,
                "operator": node.operator,
                "values": [_value(v) for v in node.values],
                "parameter": node.parameter,
                "filter": None if node.filter is None else _filter(node.filter),
            }
        }
    if isinstance(node, AllOf):
        return {"all": [_filter(f) for f in node.filters]}
    if isinstance(node, AnyOf):
        return {"any": [_filter(f) for f in node.filters]}
    if isinstance(node, Negate):
        return {"negate": _filter(node.filter)}
    return {"empty": None}


def _filter_of(data: dict[str, Any]) -> Filter:
    if "condition" in data:
        c = data["condition"]
        return Condition(c["attribute"], c["operator"], tuple(_value_of(v) for v in c["values"]), c["parameter"])
    if "link" in data:
        link = data["link"]
        return LinkCondition(
            link=link["link"],
            measure=link["measure"],
            attribute=link["attribute"],
            operator=link["operator"],
            values=tuple(_value_of(v) for v in link["values"]),
            parameter=link["parameter"],
            filter=None if link["filter"] is None else _filter_of(link["filter"]),
        )
    if "all" in data:
        return AllOf(tuple(_filter_of(f) for f in data["all"]))
    if "any" in data:
        return AnyOf(tuple(_filter_of(f) for f in data["any"]))
    if "negate" in data:
        return Negate(_filter_of(data["negate"]))
    return EmptyFilter()
