"""Strict value coercion to attribute types, the reading of Value messages, and canonical key text."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from audience_svc.coercion import (
    CoercionError,
    Malformed,
    canonical_text,
    coerce_operand,
    coerce_value,
    key_text,
    text_parser,
    value_coercer,
)
from audience_svc.schema import Attribute
from audience_svc.servicer import raw_value
from carillon.type.v1 import value_pb2

STOCKHOLM = dt.timezone(dt.timedelta(hours=2))


@pytest.mark.parametrize(
    ("attribute_type", "value", "expected"),
    [
        ("string", "hello", "hello"),
        ("integer", 42, 42),
        ("decimal", Decimal("12.50"), Decimal("12.5")),
        ("decimal", 7, Decimal(7)),
        ("boolean", False, False),
        ("date", dt.date(2024, 2, 29), dt.date(2024, 2, 29)),
        (
            "timestamp",
            dt.datetime(2024, 1, 1, 12, tzinfo=STOCKHOLM),
            dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC),
        ),
    ],
)
def test_a_value_of_the_attribute_type_is_accepted(attribute_type: str, value: object, expected: object) -> None:
    coerced = coerce_operand(attribute_type, value)  # type: ignore[arg-type]
    assert coerced == expected
    assert type(coerced) is type(expected)


def test_a_timestamp_is_normalized_to_utc() -> None:
    coerced = coerce_operand("timestamp", dt.datetime(2024, 1, 1, 12, tzinfo=STOCKHOLM))
    assert isinstance(coerced, dt.datetime)
    assert coerced.tzinfo == dt.UTC


@pytest.mark.parametrize(
    ("attribute_type", "value"),
    [
        ("string", 1),
        ("integer", "1"),
        ("integer", True),
        ("integer", Decimal("1")),
        ("decimal", "1.5"),
        ("decimal", True),
        ("boolean", 1),
        ("boolean", "true"),
        ("date", "2024-01-01"),
        ("date", dt.datetime(2024, 1, 1, tzinfo=dt.UTC)),
        ("timestamp", dt.date(2024, 1, 1)),
        ("timestamp", dt.datetime(2024, 1, 1)),
        ("enum", 3),
    ],
)
def test_a_value_of_another_type_is_refused(attribute_type: str, value: object) -> None:
    with pytest.raises(CoercionError):
        coerce_operand(attribute_type, value, ("gold",))  # type: ignore[arg-type]


def test_an_enum_value_must_be_one_of_the_allowed_values() -> None:
    assert coerce_operand("enum", "gold", ("gold", "silver")) == "gold"
    with pytest.raises(CoercionError):
        coerce_operand("enum", "bronze", ("gold", "silver"))


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), Decimal("1e28"), Decimal("0.00000000001")])
def test_a_decimal_that_does_not_fit_numeric_38_10_is_refused(value: Decimal) -> None:
    with pytest.raises(CoercionError):
        coerce_operand("decimal", value)


def test_an_integer_beyond_64_bits_is_refused() -> None:
    with pytest.raises(CoercionError):
        coerce_operand("integer", 2**63)


def test_a_string_with_a_nul_character_is_refused() -> None:
    with pytest.raises(CoercionError):
        coerce_operand("string", "a\x00b")


def test_null_is_stored_only_in_a_nullable_attribute() -> None:
    assert coerce_value(Attribute("age", "integer", nullable=True), None) is None
    with pytest.raises(CoercionError):
        coerce_value(Attribute("age", "integer"), None)


def test_null_is_never_an_operand() -> None:
    with pytest.raises(CoercionError):
        coerce_operand("integer", None)


def test_a_malformed_value_is_refused_with_its_problem() -> None:
    with pytest.raises(CoercionError, match="not a date"):
        coerce_operand("date", Malformed("date", "'x' is not a date"))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (value_pb2.Value(string_value="x"), "x"),
        (value_pb2.Value(integer_value=5), 5),
        (value_pb2.Value(decimal_value="-12.50"), Decimal("-12.50")),
        (value_pb2.Value(boolean_value=True), True),
        (value_pb2.Value(date_value="2024-02-29"), dt.date(2024, 2, 29)),
        (value_pb2.Value(null_value=struct_pb2.NULL_VALUE), None),
        (
            value_pb2.Value(timestamp_value=timestamp_pb2.Timestamp(seconds=0)),
            dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        ),
    ],
)
def test_a_value_message_reads_as_the_python_value_of_its_kind(message: value_pb2.Value, expected: object) -> None:
    assert raw_value(message) == expected


@pytest.mark.parametrize(
    "message",
    [
        value_pb2.Value(),
        value_pb2.Value(decimal_value="abc"),
        value_pb2.Value(decimal_value="1_000"),
        value_pb2.Value(decimal_value=" 1"),
        value_pb2.Value(date_value="2024-02-30"),
        value_pb2.Value(date_value="20240101"),
    ],
)
def test_an_unreadable_value_message_reads_as_malformed(message: value_pb2.Value) -> None:
    assert isinstance(raw_value(message), Malformed)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("abc", "abc"),
        (-3, "-3"),
        (Decimal("12.5000000000"), "12.5"),
        (Decimal("1E+2"), "100"),
        (Decimal("0E-10"), "0"),
        (True, "true"),
        (dt.date(2024, 1, 2), "2024-01-02"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=STOCKHOLM), "2024-01-02T01:04:05Z"),
        (None, ""),
    ],
)
def test_canonical_text_of_each_type(value: object, text: str) -> None:
    assert canonical_text(value) == text  # type: ignore[arg-type]


def test_a_composite_key_joins_its_texts_with_a_bar() -> None:
    assert key_text(["acme", 42, dt.date(2024, 1, 2)]) == "acme|42|2024-01-02"


@pytest.mark.parametrize(
    ("attribute_type", "text", "expected"),
    [
        ("string", "", ""),
        ("integer", "-42", -42),
        ("integer", "+7", 7),
        ("integer", "9223372036854775807", 2**63 - 1),
        ("decimal", "12.50", Decimal("12.5")),
        ("decimal", ".5", Decimal("0.5")),
        ("decimal", "1.5e3", Decimal("1500")),
        ("decimal", "-0.000", Decimal(0)),
        ("boolean", "TRUE", True),
        ("boolean", "f", False),
        ("boolean", "1", True),
        ("date", "2024-02-29", dt.date(2024, 2, 29)),
        ("timestamp", "2024-01-01T12:00:00+02:00", dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC)),
        ("timestamp", "2024-01-01 12:00:00.25Z", dt.datetime(2024, 1, 1, 12, 0, 0, 250000, tzinfo=dt.UTC)),
    ],
)
def test_text_values_of_the_block_format_parse_to_their_type(attribute_type: str, text: str, expected: object) -> None:
    value = text_parser(attribute_type)(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("attribute_type", "text"),
    [
        ("string", "nul\x00"),
        ("integer", " 42"),
        ("integer", "1_000"),
        ("integer", "0x10"),
        ("integer", "٤٢"),
        ("integer", "9223372036854775808"),
        ("decimal", "NaN"),
        ("decimal", "1e28"),
        ("decimal", "1e999999999"),
        ("decimal", "0.00000000001"),
        ("decimal", "1,5"),
        ("boolean", "yes"),
        ("boolean", " true"),
        ("date", "2024-02-30"),
        ("date", "0000-01-01"),
        ("date", "20240101"),
        ("timestamp", "2024-01-01T12:00:00"),
        ("timestamp", "2024-01-01T24:00:00Z"),
        ("timestamp", "2024-01-01T12:00:60Z"),
        ("timestamp", "2024-01-01T12:00:00.1234567Z"),
        ("timestamp", "0001-01-01T00:00:00+01:00"),
    ],
)
def test_text_outside_the_block_grammar_is_refused(attribute_type: str, text: str) -> None:
    with pytest.raises(CoercionError):
        text_parser(attribute_type)(text)


def test_an_enum_text_must_be_one_of_the_values() -> None:
    parse = text_parser("enum", ("gold", "silver"))
    assert parse("gold") == "gold"
    with pytest.raises(CoercionError):
        parse("Gold")


@pytest.mark.parametrize(
    "attribute",
    [
        Attribute("s", "string"),
        Attribute("e", "enum", nullable=True, enum_values=("gold", "silver")),
        Attribute("i", "integer"),
        Attribute("d", "decimal", nullable=True),
        Attribute("b", "boolean"),
    ],
)
def test_the_per_attribute_coercer_agrees_with_coerce_value(attribute: Attribute) -> None:
    raws: list[object] = ["gold", "x\x00", "", 7, 2**63, -(2**63), True, Decimal("1.5"), None, Malformed("date", "bad")]
    coerce = value_coercer(attribute)
    for raw in raws:
        try:
            expected: object = coerce_value(attribute, raw)  # type: ignore[arg-type]
        except CoercionError as exc:
            expected = ("refused", str(exc))
        try:
            got: object = coerce(raw)  # type: ignore[arg-type]
        except CoercionError as exc:
            got = ("refused", str(exc))
        assert got == expected and type(got) is type(expected), raw
