"""Conversions between ``carillon.type.v1.Value`` and plain Python values.

Python side: None, str, int, Decimal, bool, datetime.date and timezone-aware datetime (a
:data:`PyValue`); a ``list_value`` is a Python list and a ``struct_value`` a dict of such values
(collection enrichments of streamed rows, which templates loop over). The attribute-typed coercion
(is this value of that attribute's type?) lives in the audience domain; this module only maps
representations.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from carillon.type.v1 import value_pb2

PyValue = None | str | int | Decimal | bool | dt.date | dt.datetime


def to_timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp from a datetime (naive datetimes are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(dt.UTC))
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    """A timezone-aware UTC datetime from a protobuf Timestamp."""
    return stamp.ToDatetime(tzinfo=dt.UTC)


def to_value(value: Any) -> value_pb2.Value:
    """The Value message for a Python value."""
    if value is None:
        return value_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return value_pb2.Value(boolean_value=value)
    if isinstance(value, int):
        return value_pb2.Value(integer_value=value)
    if isinstance(value, Decimal):
        return value_pb2.Value(decimal_value=format(value, "f"))
    if isinstance(value, float):
        return value_pb2.Value(decimal_value=repr(value))
    if isinstance(value, dt.datetime):
        return value_pb2.Value(timestamp_value=to_timestamp(value))
    if isinstance(value, dt.date):
        return value_pb2.Value(date_value=value.isoformat())
    if isinstance(value, list | tuple):
        return value_pb2.Value(list_value=value_pb2.ListValue(values=[to_value(v) for v in value]))
    if isinstance(value, Mapping):
        return value_pb2.Value(struct_value=value_pb2.StructValue(fields=to_value_map(value)))
    return value_pb2.Value(string_value=str(value))


def from_value(value: value_pb2.Value) -> PyValue:
    """The Python value of a scalar Value message, as sent (no coercion); None when unset or null.

    ValueError for a list or struct (see :func:`from_nested_value`).
    """
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind in ("list_value", "struct_value"):
        raise ValueError(f"a {kind} is not a scalar value")
    if kind == "decimal_value":
        return Decimal(value.decimal_value)
    if kind == "timestamp_value":
        return from_timestamp(value.timestamp_value)
    if kind == "date_value":
        return dt.date.fromisoformat(value.date_value)
    result: PyValue = getattr(value, kind)
    return result


def to_value_map(values: Mapping[str, Any]) -> dict[str, value_pb2.Value]:
    """A map of Value messages from a mapping of Python values."""
    return {key: to_value(val) for key, val in values.items()}


def from_nested_value(value: value_pb2.Value) -> Any:
    """The Python value of any Value message: a list for a ``list_value``, a dict for a ``struct_value``."""
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [from_nested_value(v) for v in value.list_value.values]
    if kind == "struct_value":
        return from_value_map(value.struct_value.fields)
    return from_value(value)


def from_value_map(values: Mapping[str, value_pb2.Value]) -> dict[str, Any]:
    """A dict of Python values from a protobuf map of Values (lists and structs included)."""
    return {key: from_nested_value(val) for key, val in values.items()}
