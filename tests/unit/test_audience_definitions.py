"""The stored JSON form of saved audience definitions keeps every node and every value kind."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from audience_svc.definitions import query_from_json, query_to_json
from audience_svc.query import AllOf, AnyOf, AudienceQuery, Condition, LinkCondition, Negate


def test_a_query_with_every_node_and_value_kind_round_trips() -> None:
    query = AudienceQuery(
        "customers",
        AllOf(
            (
                Condition("name", "in", ("x", "y")),
                Condition("age", "between", (1, 2)),
                Condition("balance", "less", (Decimal("1.50"),)),
                Condition("vip", "equal", (True,)),
                Condition("born", "equal", (dt.date(2024, 2, 29),)),
                Condition("seen", "greater", (dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC),)),
                Condition("seen", "within_last_days", parameter="days"),
                AnyOf((Condition("tier", "is_null"), Negate(Condition("hotel.city", "equal", ("Paris",))))),
                LinkCondition(
                    "bookings",
                    "sum",
                    attribute="amount",
                    operator="greater",
                    values=(Decimal(10),),
                    filter=Condition("nights", "equal", (2,)),
                ),
                LinkCondition("bookings", "not_exists"),
            )
        ),
    )
    assert query_from_json(query_to_json(query)) == query


def test_a_query_without_a_filter_round_trips() -> None:
    assert query_from_json(query_to_json(AudienceQuery("customers"))) == AudienceQuery("customers")
