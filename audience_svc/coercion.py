"""Strict coercion of incoming values to attribute types, and the canonical text of stored values.

Incoming values arrive as the Python value of the ``Value`` kind the client set (see
:mod:`carillon_chassis.values`): ``str`` for ``string_value``, ``int`` for ``integer_value``,
``Decimal`` for ``decimal_value`` and so on. A value whose own text could not be read (``date_value``
"2024-02-30", ``decimal_value`` "abc") arrives as :class:`Malformed`, so that it is reported with the
other violations instead of failing the whole request on the first one.

Coercion is strict: a string attribute takes only a string value, an integer attribute only an
integer value; the one widening is an integer value for a decimal attribute. Timestamps must be
timezone-aware and are normalized to UTC; decimals must be finite and fit ``NUMERIC(38, 10)``.

Values of the bulk wire format (a CSV block) arrive as text; :func:`text_parser` gives the parser of
one attribute type, precompiled once per column. Each accepts exactly one textual grammar (ASCII
digits only, no surrounding spaces), documented on ``RecordBlock.csv``, and ends with the same
checks as :func:`coerce_operand`, so a value means the same whichever wire format carried it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from audience_svc.schema import Attribute
from carillon_chassis.database import as_utc
from carillon_chassis.values import PyValue

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# NUMERIC(38, 10): at most 28 digits before the decimal point and 10 after it.
DECIMAL_INTEGER_DIGITS = 28
DECIMAL_SCALE = 10


@dataclass(frozen=True)
class Malformed:
    """A value the client sent whose own representation is invalid (or that has no kind set)."""

    kind: str
    problem: str


RawValue = PyValue | Malformed


class CoercionError(ValueError):
    """A value does not fit an attribute; the message says why (it becomes a field violation)."""


def kind_of(value: RawValue) -> str:
    """The name of the ``Value`` kind a raw value came from, for error messages."""
    if isinstance(value, Malformed):
        return value.kind
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, Decimal):
        return "decimal"
    if isinstance(value, dt.datetime):
        return "timestamp"
    if isinstance(value, dt.date):
        return "date"
    return "string"


def coerce_value(attribute: Attribute, value: RawValue) -> PyValue:
    """The value to store in ``attribute``: null only when the attribute is nullable."""
    if value is None:
        if attribute.nullable:
            return None
        raise CoercionError(f"{attribute.name} must not be null")
    return coerce_operand(attribute.type, value, attribute.enum_values)


def value_coercer(attribute: Attribute) -> Callable[[RawValue], PyValue]:
    """:func:`coerce_value` for one attribute, built once per batch: the common exact kinds return at once."""
    kind = attribute.type

    def coerce(value: RawValue) -> PyValue:
        return coerce_value(attribute, value)

    if kind == "string":

        def coerce_string(value: RawValue) -> PyValue:
            return value if type(value) is str and "\x00" not in value else coerce(value)

        return coerce_string
    if kind == "enum":
        allowed = frozenset(attribute.enum_values)

        def coerce_enum(value: RawValue) -> PyValue:
            return value if type(value) is str and value in allowed else coerce(value)

        return coerce_enum
    if kind == "integer":

        def coerce_integer(value: RawValue) -> PyValue:
            return value if type(value) is int and INT64_MIN <= value <= INT64_MAX else coerce(value)

        return coerce_integer
    return coerce


def coerce_operand(attribute_type: str, value: RawValue, enum_values: tuple[str, ...] = ()) -> PyValue:
    """A non-null value of type ``attribute_type`` (an enum value must be one of ``enum_values``)."""
    if isinstance(value, Malformed):
        raise CoercionError(value.problem)
    if value is None:
        raise CoercionError("a null value is not allowed here")
    if attribute_type in ("string", "enum"):
        if not isinstance(value, str):
            raise _mismatch(attribute_type, value)
        if "\x00" in value:
            raise CoercionError("strings must not contain the NUL character")
        if attribute_type == "enum" and value not in enum_values:
            raise CoercionError(f"{value!r} is not one of the enum values {list(enum_values)}")
        return value
    if attribute_type == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(attribute_type, value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise CoercionError("integers must fit in 64 bits")
        return value
    if attribute_type == "decimal":
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise _mismatch(attribute_type, value)
        return _decimal(Decimal(value))
    if attribute_type == "boolean":
        if not isinstance(value, bool):
            raise _mismatch(attribute_type, value)
        return value
    if attribute_type == "date":
        if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
            raise _mismatch(attribute_type, value)
        return value
    if attribute_type == "timestamp":
        if not isinstance(value, dt.datetime):
            raise _mismatch(attribute_type, value)
        if value.tzinfo is None:
            raise CoercionError("timestamps must be timezone-aware")
        return value.astimezone(dt.UTC)
    raise CoercionError(f"unknown attribute type {attribute_type!r}")


def _mismatch(attribute_type: str, value: RawValue) -> CoercionError:
    return CoercionError(f"expected a {attribute_type} value, got a {kind_of(value)} value")


def _decimal(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise CoercionError("decimals must be finite numbers")
    if value.is_zero():
        return Decimal(0)
    # adjusted() needs no context, so huge exponents are refused before normalize() could overflow.
    if value.adjusted() >= DECIMAL_INTEGER_DIGITS:
        raise CoercionError(f"decimals have at most {DECIMAL_INTEGER_DIGITS} digits before the point")
    if value.adjusted() < -DECIMAL_SCALE:
        raise CoercionError(f"decimals have at most {DECIMAL_SCALE} digits after the point")
    normalized = value.normalize()
    if normalized.adjusted() >= DECIMAL_INTEGER_DIGITS:  # rounded up to 28 significant digits
        raise CoercionError(f"decimals have at most {DECIMAL_INTEGER_DIGITS} digits before the point")
    exponent = normalized.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -DECIMAL_SCALE:
        raise CoercionError(f"decimals have at most {DECIMAL_SCALE} digits after the point")
    return normalized


TextParser = Callable[[str], PyValue]

INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
TIMESTAMP_TEXT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
BOOLEAN_TEXTS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


def text_parser(attribute_type: str, enum_values: tuple[str, ...] = ()) -> TextParser:
    """The parser of a non-null text value of ``attribute_type``; it raises CoercionError when invalid."""
    if attribute_type == "string":
        return _string_text
    if attribute_type == "enum":
        allowed = frozenset(enum_values)

        def enum_text(text: str) -> PyValue:
            if text not in allowed:
                raise CoercionError(f"{text!r} is not one of the enum values {list(enum_values)}")
            return text

        return enum_text
    parser = _TEXT_PARSERS.get(attribute_type)
    if parser is None:
        raise CoercionError(f"unknown attribute type {attribute_type!r}")
    return parser


def _string_text(text: str) -> PyValue:
    if "\x00" in text:
        raise CoercionError("strings must not contain the NUL character")
    return text


def _integer_text(text: str) -> PyValue:
    if not INTEGER_TEXT.fullmatch(text):
        raise CoercionError(f"{text!r} is not an integer")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise CoercionError("integers must fit in 64 bits")
    return value


def _decimal_text(text: str) -> PyValue:
    if not DECIMAL_TEXT.fullmatch(text):
        raise CoercionError(f"{text!r} is not a decimal number")
    try:
        return _decimal(Decimal(text))
    except (InvalidOperation, ArithmeticError) as exc:
        raise CoercionError(f"{text!r} is not a decimal number") from exc


def _boolean_text(text: str) -> PyValue:
    value = BOOLEAN_TEXTS.get(text.lower())
    if value is None:
        raise CoercionError(f"{text!r} is not a boolean (true or false)")
    return value


def _date_text(text: str) -> PyValue:
    if DATE_TEXT.fullmatch(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass
    raise CoercionError(f"{text!r} is not a date in YYYY-MM-DD form")


def _timestamp_text(text: str) -> PyValue:
    if TIMESTAMP_TEXT.fullmatch(text):
        try:
            return dt.datetime.fromisoformat(text).astimezone(dt.UTC)
        except (ValueError, OverflowError):
            pass
    raise CoercionError(f"{text!r} is not a timestamp like 2024-05-01T12:00:00Z (with Z or a +HH:MM offset)")


_TEXT_PARSERS: dict[str, TextParser] = {
    "integer": _integer_text,
    "decimal": _decimal_text,
    "boolean": _boolean_text,
    "date": _date_text,
    "timestamp": _timestamp_text,
}


def from_database(attribute_type: str, value: object) -> PyValue:
    """A value read from an entity column, in the domain's form (UTC datetimes, normalized decimals)."""
    if value is None:
        return None
    if attribute_type == "timestamp" and isinstance(value, dt.datetime):
        return as_utc(value)
    if attribute_type == "decimal" and isinstance(value, Decimal | int | float):
        number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
        return Decimal(0) if number.is_zero() else number.normalize()
    if isinstance(value, str | int | bool | Decimal | dt.date):
        return value
    raise TypeError(f"unexpected database value {value!r} for a {attribute_type} attribute")


def canonical_text(value: PyValue) -> str:
    """The canonical text of a value, as used in entity keys and identities.

    Strings as they are, integers in decimal, decimals without exponent or trailing zeros,
    booleans ``true``/``false``, dates ``YYYY-MM-DD`` and timestamps in RFC 3339 UTC (``...Z``);
    null is the empty string.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return "0" if value.is_zero() else format(value.normalize(), "f")
    if isinstance(value, dt.datetime):
        utc = as_utc(value)
        assert utc is not None
        return utc.isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def key_text(values: Sequence[PyValue]) -> str:
    """The canonical text of a primary key: its values' texts joined by ``|``."""
    return "|".join(canonical_text(v) for v in values)


def stored_key_text(key_attributes: Sequence[Attribute], row: Sequence[object]) -> str:
    """The canonical key text of primary-key values as read from the database."""
    return key_text([from_database(a.type, v) for a, v in zip(key_attributes, row, strict=True)])
