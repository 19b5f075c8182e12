"""profile_stub reads a batch's rows key by key, whatever the tables' size and statistics, on both backends.

Before a fast-growing table is analyzed, PostgreSQL estimates that each of a batch's thousands of keys
matches 0.5 % of the rows, and planned ``column = ANY(:keys)`` as a read of the sandbox's whole index
range, filtered: each batch cost more as the communications grew. Every read of a batch is now one index
probe (or one index range) per key. The plans are read inside the real transactions (their settings
included) on tables of 20,000 rows and more, loaded without ANALYZE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from carillon_chassis.database import Database
from profile_stub.capping import CappingRule
from profile_stub.keysets import custom_plans, insert_rows
from profile_stub.profiles import Communication, Consent, MessageKeys, Profile, ProfileStore
from profile_stub.quarantine import DeliveryEvent
from profile_stub.tables import MIGRATIONS, CommunicationRow
from tests.conftest import DatabaseFactory

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PROFILES = 20_000
BATCH = 500
# profile_stub's tables read by key (the capping rules are read whole, a handful per sandbox).
TABLES = (
    "profiles",
    "profile_identities",
    "consents",
    "purpose_consents",
    "profile_attributes",
    "address_quarantines",
    "communications",
    "delivery_events",
)
_SCAN = re.compile(r"^\s*(?:->\s*)?((?:Seq|Index|Index Only|Bitmap Heap|Tid|Tid Range) Scan)(?: using \S+)? on (\w+)")


def pid(i: int) -> str:
    return f"p{i:05d}"


def email(i: int) -> str:
    return f"{pid(i)}@example.com"


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    store = ProfileStore(database)
    profiles = [
        Profile(
            pid(i),
            [("email", email(i)), ("crm", f"c{i}")],
            consents=[Consent("email", "opted_in", "form"), Consent("email", "opted_in", "form", purpose="news")],
            attributes={"tier": "gold"} if i % 2 else {},
        )
        for i in range(PROFILES)
    ]
    store.upsert_profiles("prod", profiles)
    store.upsert_profiles("other", profiles[:2000])  # the same profile ids in another sandbox
    store.create_capping_rule("prod", CappingRule("daily", 3, "day", channel="email"))
    store.record_delivery_events("prod", [DeliveryEvent("e1", "email", "hard_bounce", address=email(7))])
    # A long history (old sends) for every profile, and live reservations of profiles outside the batches,
    # loaded fast: no statistics.
    with database.engine.begin() as conn:
        insert_rows(
            conn,
            CommunicationRow.__table__,  # type: ignore[attr-defined]
            [
                {
                    "sandbox": "prod",
                    "message_id": f"h{i}",
                    "profile_id": pid(i % PROFILES),
                    "channel": "email",
                    "category": "marketing",
                    "campaign": "",
                    "run": "",
                    "activity": "",
                    "send_time": NOW - timedelta(days=2 + i % 50),
                }
                for i in range(2 * PROFILES)
            ],
        )
        insert_rows(
            conn,
            CommunicationRow.__table__,  # type: ignore[attr-defined]
            [
                {
                    "sandbox": "prod",
                    "message_id": f"r{i}",
                    "profile_id": pid(PROFILES // 2 + i % (PROFILES // 2)),
                    "channel": "email",
                    "category": "marketing",
                    "campaign": "",
                    "run": "",
                    "activity": "",
                    "send_time": NOW,
                    "expire_time": NOW + timedelta(hours=1),
                }
                for i in range(PROFILES)
            ],
        )
    return store


@contextmanager
def plans_of(database: Database) -> Iterator[list[tuple[str, str]]]:
    """The (statement, plan) of every statement run meanwhile that reads rows of many keys, explained in
    its own transaction, with its settings."""
    plans: list[tuple[str, str]] = []

    def explain(conn: object, cursor: Any, statement: str, parameters: Any, *args: object) -> None:
        if isinstance(parameters, list) or not statement.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE")):
            return  # (an executemany has no one plan; inserts read no table)
        if not re.search(r"unnest|= ANY| IN \(", statement):
            return  # (settings, and reads of one key)
        other = cursor.connection.cursor()
        other.execute(("EXPLAIN " if database.is_postgres else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plans.append((statement, "\n".join(str(row[0] if database.is_postgres else row[-1]) for row in other)))

    sa.event.listen(database.engine, "after_cursor_execute", explain)
    try:
        yield plans
    finally:
        sa.event.remove(database.engine, "after_cursor_execute", explain)


def whole_range_reads(plan: str, postgres: bool) -> list[str]:
    """The nodes of ``plan`` that read one of profile_stub's tables otherwise than by key: a join that
    hashes or merges, a sequential scan, or an index or bitmap scan whose conditions name no key of the
    batch (``asked``, the keys unnested), which reads the sandbox's whole range; a TID scan reads the
    rows found by key. On SQLite: a SCAN of a table (a SEARCH uses an index)."""
    if not postgres:
        return [line for line in plan.splitlines() if line.split()[:2] in (["SCAN", t] for t in TABLES)]
    lines = plan.splitlines()
    bad = [line for line in lines if re.search(r"Hash Join|Hash Semi|Hash Anti|Merge|Seq Scan", line)]
    for index, line in enumerate(lines):
        node = _SCAN.match(line)
        if node is None or node.group(2) not in TABLES or node.group(1) == "Tid Scan":
            continue
        details = []
        for following in lines[index + 1 :]:
            if "->" in following:
                break
            details.append(following)
        conditions = [d for d in details if re.search(r"(Index Cond|Recheck Cond):", d)]
        if not any("asked" in c for c in conditions):
            bad.append("\n".join([line, *details]))
    return bad


def test_an_eligibility_check_that_reserves_reads_every_table_by_key(store: ProfileStore) -> None:
    identities = [("email", email(i)) for i in range(BATCH)] + [("crm", f"c{i}") for i in range(BATCH, 2 * BATCH)]
    keys = MessageKeys("campaigns/c/runs/r", "email1", [""] * len(identities))

    with plans_of(store.database) as plans:
        full = store.check_eligibility(
            "prod", "email", "marketing", identities, reserve=True, message_keys=keys, now=NOW
        )
        light = store.check_eligibility(
            "prod",
            "email",
            "marketing",
            identities,
            reserve=True,
            message_ids=[f"m{i}" for i in range(len(identities))],
            full_profiles=False,
            purpose="news",
            now=NOW,
        )

    assert [r.verdict for r in full] == ["allowed"] * 7 + ["quarantined"] + ["allowed"] * (2 * BATCH - 8)
    assert [r.verdict for r in light] == [r.verdict for r in full]
    assert full[0].profile is not None and full[1].profile is not None
    assert (full[0].profile.attributes, full[1].profile.attributes) == ({}, {"tier": "gold"})
    read = " ".join(statement for statement, _ in plans)
    assert all(table in read for table in TABLES if table != "delivery_events"), read
    assert {(s[:60], p) for s, p in plans if whole_range_reads(p, store.database.is_postgres)} == set()


def test_recording_and_releasing_a_batch_reads_and_deletes_by_key(store: ProfileStore) -> None:
    identities = [("email", email(i)) for i in range(BATCH)]
    reserved = store.check_eligibility(
        "prod", "email", "marketing", identities, reserve=True, message_ids=[f"m{i}" for i in range(BATCH)], now=NOW
    )
    communications = [Communication(f"m{i}", pid(i), "email", "marketing", send_time=NOW) for i in range(BATCH)]
    communications += [Communication(f"n{i}", pid(i), "sms", "transactional", send_time=NOW) for i in range(50)]

    with plans_of(store.database) as plans:
        recorded = store.record_communications("prod", communications)
        released = store.release_reservations("prod", [f"r{i}" for i in range(BATCH)] + ["unknown"])

    assert [i for i, r in enumerate(reserved) if not r.reserved] == [7]  # quarantined
    assert (recorded, released) == (BATCH + 50, BATCH)
    assert len(store.history("prod", pid(3))) == 2 + 2  # two old sends, then m3 and n3
    statements = " ".join(statement.upper() for statement, _ in plans)
    assert "UPDATE COMMUNICATIONS" in statements and "DELETE FROM COMMUNICATIONS" in statements
    assert "FROM PROFILES" in statements
    assert {(s[:60], p) for s, p in plans if whole_range_reads(p, store.database.is_postgres)} == set()


def test_upserting_known_profiles_and_recording_feedback_read_and_delete_by_key(store: ProfileStore) -> None:
    changed = [Profile(pid(i), [("email", email(i))], first_name="New") for i in range(BATCH)]
    events = [DeliveryEvent(f"d{i}", "email", "delivered", address=email(i)) for i in range(BATCH)]

    with plans_of(store.database) as plans:
        counts = store.upsert_profiles("prod", changed)
        applied = store.record_delivery_events("prod", events)

    assert (counts, applied) == ((0, BATCH), BATCH)
    assert store.get_profile("prod", pid(1)).identities == [("email", email(1))]
    assert store.get_profile("other", pid(1)).identities == [("crm", "c1"), ("email", email(1))]  # untouched
    statements = " ".join(statement.upper() for statement, _ in plans)
    assert "DELETE FROM PROFILE_IDENTITIES" in statements or "FROM PROFILE_IDENTITIES" in statements
    assert {(s[:60], p) for s, p in plans if whole_range_reads(p, store.database.is_postgres)} == set()


def test_the_whole_range_check_sees_a_read_of_the_sandboxs_range(tmp_path: Path) -> None:
    # The check itself can fail: the read profile_stub made before (``column = ANY(:keys)``) is flagged.
    factory = DatabaseFactory("postgresql", tmp_path)
    try:
        database = factory("profile")
        database.migrate(MIGRATIONS)
        ProfileStore(database).upsert_profiles("prod", [Profile(pid(i)) for i in range(PROFILES)])
        table = CommunicationRow.__table__  # type: ignore[attr-defined]
        rows = [
            {
                "sandbox": "prod",
                "message_id": f"h{i}",
                "profile_id": pid(i % PROFILES),
                "channel": "email",
                "category": "marketing",
                "campaign": "",
                "run": "",
                "activity": "",
                "send_time": NOW,
            }
            for i in range(PROFILES)
        ]
        with database.engine.begin() as conn:
            insert_rows(conn, table, rows)
        with plans_of(database) as plans, database.engine.begin() as conn:
            custom_plans(conn)
            keys = sa.literal([f"h{i}" for i in range(BATCH)], postgresql.ARRAY(sa.Text))
            conn.execute(
                sa.select(table.c.profile_id).where(table.c.sandbox == "prod", table.c.message_id == sa.any_(keys))
            )
    finally:
        factory.cleanup()

    ((_, plan),) = plans
    assert whole_range_reads(plan, postgres=True), plan


def test_migration_3_indexes_the_communications_by_profile_and_send_time_and_migration_4_by_count_time(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("profile")
    database.migrate(MIGRATIONS)
    with database.engine.begin() as conn:  # back to the indexes of version 2
        conn.execute(sa.text("DROP INDEX ix_communications_profile_count_time"))
        conn.execute(sa.text("CREATE INDEX ix_communications_profile_id ON communications (profile_id)"))
        conn.execute(sa.text("DELETE FROM carillon_schema_migrations WHERE version IN (3, 4)"))

    def indexes() -> dict[str | None, list[str | None]]:
        with database.engine.connect() as conn:
            return {i["name"]: i["column_names"] for i in sa.inspect(conn).get_indexes("communications")}

    assert database.migrate(MIGRATIONS[:3]) == [3]
    assert indexes() == {"ix_communications_profile_send_time": ["profile_id", "send_time"]}
    assert database.migrate(MIGRATIONS) == [4]
    assert indexes() == {"ix_communications_profile_count_time": ["profile_id", "count_time"]}
    assert database.migrate(MIGRATIONS) == []


def test_the_sends_and_identities_of_the_same_profile_id_in_another_sandbox_do_not_count(
    make_database: Callable[[str], Database],
) -> None:
    # Reads by profile check the sandbox outside their index probe: the other sandbox's rows are left out.
    store = ProfileStore(make_database("profile"))
    store.database.migrate(MIGRATIONS)
    for sandbox in ("prod", "other"):
        store.upsert_profiles(
            sandbox, [Profile("ann", [("email", f"ann@{sandbox}.com")], consents=[Consent("email", "opted_in", "f")])]
        )
        store.create_capping_rule(sandbox, CappingRule("daily", 1, "day", channel="email"))
    store.record_communications("other", [Communication("o1", "ann", "email", "marketing", send_time=NOW)])
    store.check_eligibility(
        "other", "email", "marketing", [("email", "ann@other.com")], reserve=True, message_ids=["o2"], now=NOW
    )

    (prod,) = store.check_eligibility(
        "prod", "email", "marketing", [("email", "ann@prod.com")], reserve=True, message_ids=["p1"], now=NOW
    )
    (other,) = store.check_eligibility("other", "email", "marketing", [("email", "ann@other.com")], now=NOW)

    assert (prod.verdict, prod.reserved, prod.addresses) == ("allowed", True, ["ann@prod.com"])
    assert other.verdict == "capped"
