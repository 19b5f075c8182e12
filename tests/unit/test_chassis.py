"""Chassis pieces that need no server: names, page tokens, values and rich error statuses."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import grpc
import pytest
from google.rpc import error_details_pb2

from carillon_chassis.errors import FieldViolation, InvalidArgument, NotFound, to_status
from carillon_chassis.names import parse_name, validate_id
from carillon_chassis.pagination import decode_token, encode_token, page_size
from carillon_chassis.sandbox import validate_sandbox
from carillon_chassis.values import from_value, to_value


def test_parse_name_returns_the_ids_of_a_nested_name() -> None:
    assert parse_name("campaigns/spring/runs/r1", "campaigns", "runs") == ["spring", "r1"]


@pytest.mark.parametrize("name", ["", "campaigns", "campaign/x", "campaigns/X", "campaigns/a/b", "campaigns/a/runs"])
def test_a_malformed_name_is_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_name(name, "campaigns", field="parent")
    assert [v.field for v in caught.value.violations] == ["parent"]


def test_ids_must_start_with_a_letter() -> None:
    assert validate_id("a-1_b", "id") == "a-1_b"
    with pytest.raises(InvalidArgument):
        validate_id("1abc", "id")


def test_page_tokens_round_trip_and_garbage_is_refused() -> None:
    assert decode_token(encode_token(["a", 3])) == ["a", 3]
    assert decode_token("") is None
    with pytest.raises(InvalidArgument) as caught:
        decode_token("not a token!")
    assert caught.value.violations[0].field == "page_token"


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert page_size(0) == 50
    assert page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        page_size(-1)


@pytest.mark.parametrize(
    "value",
    [None, "text", 42, True, Decimal("12.50"), dt.date(2026, 11, 29), dt.datetime(2026, 11, 29, 9, 0, tzinfo=dt.UTC)],
)
def test_values_round_trip_through_the_proto(value: object) -> None:
    assert from_value(to_value(value)) == value


def test_a_bad_sandbox_name_is_refused() -> None:
    assert validate_sandbox("prod") == "prod"
    with pytest.raises(InvalidArgument) as caught:
        validate_sandbox("Prod; drop")
    assert caught.value.reason == "INVALID_SANDBOX"


def test_to_status_carries_error_info_and_every_field_violation() -> None:
    error = InvalidArgument(
        "bad",
        reason="BAD_SCHEMA",
        violations=[FieldViolation("entity.primary_key", "x"), FieldViolation("entity.attributes[1].type", "y")],
    )

    status = to_status(error, "audience.carillon.dev")

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("BAD_SCHEMA", "audience.carillon.dev")
    assert [v.field for v in bad.field_violations] == ["entity.primary_key", "entity.attributes[1].type"]


def test_an_error_without_violations_has_no_bad_request_detail() -> None:
    status = to_status(NotFound("gone"), "x")
    assert len(status.details) == 1


def test_to_status_lists_at_most_fifty_violations_and_says_how_many_there_were() -> None:
    error = InvalidArgument("bad rows", violations=[FieldViolation(f"changes[{i}]", "bad") for i in range(500)])

    status = to_status(error, "audience.carillon.dev")

    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert len(bad.field_violations) == 50
    assert bad.field_violations[0].field == "changes[0]"
    assert info.metadata["violations_total"] == "500"


def test_keyset_page_walks_every_row_once_in_key_order() -> None:
    import sqlalchemy as sa

    from carillon_chassis.pagination import keyset_page

    table = sa.Table("things", sa.MetaData(), sa.Column("sandbox", sa.String), sa.Column("thing_id", sa.String))
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"sandbox": "a", "thing_id": f"t{i:02d}"} for i in range(7)])
        conn.execute(table.insert(), [{"sandbox": "b", "thing_id": "t00"}])
        seen, token, pages = [], "", 0
        while True:
            rows, token = keyset_page(conn, table, table.c.thing_id, [table.c.sandbox == "a"], 3, token)
            seen += [r["thing_id"] for r in rows]
            pages += 1
            if not token:
                break
    assert seen == [f"t{i:02d}" for i in range(7)]
    assert pages == 3
    with pytest.raises(InvalidArgument):
        keyset_page(engine.connect(), table, table.c.thing_id, [], 3, encode_token(5))
