"""The send ledger and the template store on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import AlreadyExists, InvalidArgument, NotFound
from carillon_chassis.messages import message_id
from delivery_svc.ledger import (
    Ledger,
    LedgerEntry,
    LogEvent,
    LoggedMessage,
    LogGroup,
    StatusChange,
    _durable_commits,
    logged_column,
)
from delivery_svc.message_logs import MessageLogOutbox
from delivery_svc.tables import MIGRATIONS, LedgerRow, MessageLogOutboxRow
from delivery_svc.templates import Template, TemplateStore

RUN = "campaigns/c1/runs/r1"


@pytest.fixture
def database(make_database: Callable[[str], Database]) -> Database:
    database = make_database("delivery")
    database.migrate(MIGRATIONS)
    return database


def entry(profile: str, entity_key: str = "", status: str = "pending", *, activity: str = "a1") -> LedgerEntry:
    return LedgerEntry(
        message_id=message_id("prod", RUN, activity, profile, entity_key),
        sandbox="prod",
        campaign="campaigns/c1",
        run=RUN,
        activity=activity,
        profile_key=profile,
        entity_key=entity_key,
        channel="email",
        status=status,
        address=f"{profile}@example.com",
    )


def test_the_database_refuses_a_second_row_for_the_same_ledger_key(database: Database) -> None:
    row = {
        "sandbox": "prod",
        "campaign": "campaigns/c1",
        "run": RUN,
        "activity": "a1",
        "profile_key": "ada",
        "entity_key": "r1",
        "channel": "email",
        "status": "pending",
        "reason": "",
        "address": "ada@example.com",
        "create_time": utcnow(),
        "update_time": utcnow(),
    }
    table = LedgerRow.__table__  # type: ignore[attr-defined]
    with database.engine.begin() as conn:
        conn.execute(table.insert().values(id="first", **row))

    with pytest.raises(sa.exc.IntegrityError), database.engine.begin() as conn:
        conn.execute(table.insert().values(id="second", **row))


def test_writing_a_row_whose_key_exists_keeps_the_existing_row(database: Database) -> None:
    ledger = Ledger(database)
    first = ledger.write([entry("ada", "r1")])
    ledger.mark([StatusChange(entry("ada", "r1").message_id, "sent")])

    second = ledger.write([entry("ada", "r1"), entry("bob", "r1")])
    third = ledger.write([entry("cy", "r1"), entry("dee", "r1")])

    rows = {e.profile_key: e.status for e in ledger.entries("prod", RUN, "a1")}
    assert rows == {"ada": "sent", "bob": "pending", "cy": "pending", "dee": "pending"}
    # Whether every new row was written by the call, durably: the pipeline's first attempts depend on it
    # (the chassis opens SQLite with synchronous=NORMAL, whose commits a machine crash can undo).
    durable = database.is_postgres
    assert (first, second, third) == (durable, False, durable)


def test_a_ledger_whose_commits_a_machine_crash_can_undo_says_no_row_is_surely_new(database: Database) -> None:
    # PostgreSQL with synchronous_commit off; SQLite unless synchronous is FULL (the chassis sets NORMAL).
    with database.engine.connect() as conn:
        conn.exec_driver_sql("SET synchronous_commit = off" if database.is_postgres else "PRAGMA synchronous = FULL")
        conn.commit()

        assert _durable_commits(conn) is not database.is_postgres


def test_find_returns_only_the_rows_of_the_keys_in_the_run_and_activity(database: Database) -> None:
    ledger = Ledger(database)
    ledger.write([entry("ada", "r1"), entry("ada", "r2"), entry("bob", ""), entry("ada", "r1", activity="a2")])

    found = ledger.find("prod", RUN, "a1", [("ada", "r1"), ("bob", ""), ("cy", "")])

    assert set(found) == {("ada", "r1"), ("bob", "")}
    assert found[("ada", "r1")].message_id == entry("ada", "r1").message_id


def test_find_handles_more_keys_than_one_query_chunk(database: Database) -> None:
    ledger = Ledger(database)
    ledger.write([entry(f"p{i}", "r") for i in range(2500)])

    found = ledger.find("prod", RUN, "a1", [(f"p{i}", "r") for i in range(0, 3000)])

    assert len(found) == 2500


def test_mark_records_status_and_reason_in_one_transaction(database: Database) -> None:
    ledger = Ledger(database)
    ledger.write([entry("ada"), entry("bob")])

    ledger.mark(
        [StatusChange(entry("ada").message_id, "sent"), StatusChange(entry("bob").message_id, "failed", "PROVIDER_X")]
    )

    rows = {e.profile_key: (e.status, e.reason) for e in ledger.entries("prod", RUN, "a1")}
    assert rows == {"ada": ("sent", ""), "bob": ("failed", "PROVIDER_X")}


def test_a_status_change_sets_each_rows_own_address_and_defer_time(database: Database) -> None:
    ledger = Ledger(database)
    ledger.write([entry("ada"), entry("bob"), entry("cy")])
    until = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    ledger.mark(
        [
            StatusChange(entry("ada").message_id, "pending", "", "ada@new.example.com"),
            StatusChange(entry("bob").message_id, "deferred", "", "", defer_until=until),
            StatusChange(entry("cy").message_id, "pending", "", "odd\x1fname@example.com"),
        ]
    )

    rows = {e.profile_key: (e.status, e.address, e.defer_until) for e in ledger.entries("prod", RUN, "a1")}
    assert rows == {
        "ada": ("pending", "ada@new.example.com", None),
        "bob": ("deferred", "", until),
        "cy": ("pending", "odd\x1fname@example.com", None),
    }


def test_a_batch_of_new_rows_keeps_every_column_including_empty_and_separator_values(database: Database) -> None:
    ledger = Ledger(database)
    until = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    odd = dataclasses.replace(entry("bob", "r\x1f1"), status="deferred", defer_until=until, address="")

    ledger.write([entry("ada", ""), odd])

    rows = {
        e.profile_key: (e.entity_key, e.status, e.address, e.defer_until, e.campaign)
        for e in ledger.entries("prod", RUN, "a1")
    }
    assert rows == {
        "ada": ("", "pending", "ada@example.com", None, "campaigns/c1"),
        "bob": ("r\x1f1", "deferred", "", until, "campaigns/c1"),
    }


def test_queued_message_logs_are_read_back_once_per_message_and_status(database: Database) -> None:
    ledger = Ledger(database, message_logs=True)
    ledger.write([entry("ada"), entry("bob")])
    now = utcnow()
    ada, bob = entry("ada").message_id, entry("bob").message_id

    ledger.mark([StatusChange(ada, "sent")], [LogEvent("prod", ada, "sent", now), LogEvent("prod", ada, "sent", now)])
    ledger.mark(
        [StatusChange(bob, "failed", "X")], [LogEvent("prod", ada, "sent", now), LogEvent("prod", bob, "failed", now)]
    )

    outbox = MessageLogOutbox(database)
    queued = [(w.message_id, w.status, w.attempts) for w in outbox.waiting()]
    due = [(b.sandbox, [(log.message_id, log.status, log.profile_id) for log in b.logs]) for b in outbox.due(100)]
    assert queued == [(ada, "sent", 0), (ada, "sent", 0), (bob, "failed", 0)]
    # The second batch holds a repeat only: read back empty (the flusher deletes it with the others).
    assert due == [("prod", [(ada, "sent", "ada")]), ("prod", []), ("prod", [(bob, "failed", "bob")])]


def test_a_log_group_queues_the_same_logs_as_one_event_per_message(database: Database) -> None:
    ledger = Ledger(database, message_logs=True)
    entries = [entry("ada", "r1"), entry("bob", "r1"), entry("cy", "r2")]
    ledger.write(entries)
    now = utcnow()
    ids = [e.message_id for e in entries]
    about = [LoggedMessage.of(e) for e in entries]

    ledger.mark([], [LogEvent("prod", mid, "sent", now, a) for mid, a in zip(ids, about, strict=True)], sent=ids[:1])
    grouped = {
        "campaign": "campaigns/c1",
        "run": RUN,
        "activity": "a1",
        "channel": "email",
        "profile_key": logged_column(["ada", "bob", "cy"]),
        "entity_key": logged_column(["r1", "r1", "r2"]),
        "identity_namespace": logged_column(["", "", ""]),
        "identity_value": logged_column(["", "", ""]),
    }
    ledger.mark([], [LogGroup("prod", "sent", now, ids, grouped)], sent=ids[1:])

    statuses = {e.profile_key: e.status for e in ledger.entries("prod", RUN, "a1")}
    batches = sa.table("message_log_batches", sa.column("id"), sa.column("message_ids"), sa.column("details"))
    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(batches.c.message_ids, batches.c.details).order_by(batches.c.id)).all()
    (first,) = MessageLogOutbox(database).due(100)[:1]
    assert statuses == {"ada": "sent", "bob": "sent", "cy": "sent"}
    assert grouped["identity_namespace"] == "" and grouped["entity_key"] == ["r1", "r1", "r2"]
    assert len(rows) == 2 and rows[0] == rows[1]  # the same ids and details, byte for byte
    assert [(log.message_id, log.profile_id, log.entity_key) for log in first.logs] == [
        (e.message_id, e.profile_key, e.entity_key) for e in entries
    ]


def email_template() -> Template:
    return Template(
        template_id="",
        channel="email",
        content_kind="email",
        content={"subject": "Hi {{ profile.first_name }}", "text_body": "Hello"},
        display_name="Welcome",
    )


def test_a_created_template_reads_back_with_its_parts(database: Database) -> None:
    store = TemplateStore(database)
    store.create("prod", "welcome", email_template())

    template = store.get("prod", "welcome")

    assert (template.name, template.channel, template.display_name) == ("templates/welcome", "email", "Welcome")
    assert template.content["subject"] == "Hi {{ profile.first_name }}"
    assert template.create_time is not None and template.create_time.tzinfo is not None


def test_a_taken_template_id_is_already_exists(database: Database) -> None:
    store = TemplateStore(database)
    store.create("prod", "welcome", email_template())

    with pytest.raises(AlreadyExists) as caught:
        store.create("prod", "welcome", email_template())

    assert caught.value.reason == "TEMPLATE_ALREADY_EXISTS"


def test_templates_belong_to_their_sandbox(database: Database) -> None:
    store = TemplateStore(database)
    store.create("prod", "welcome", email_template())

    with pytest.raises(NotFound):
        store.get("staging", "welcome")


def test_templates_are_listed_in_pages_in_id_order(database: Database) -> None:
    store = TemplateStore(database)
    for template_id in ("c", "a", "b"):
        store.create("prod", template_id, email_template())

    first, token = store.list("prod", 2, "")
    second, last_token = store.list("prod", 2, token)

    assert [t.template_id for t in first + second] == ["a", "b", "c"]
    assert last_token == ""


def test_a_forged_page_token_is_invalid(database: Database) -> None:
    with pytest.raises(InvalidArgument) as caught:
        TemplateStore(database).list("prod", 2, "not-a-token!")

    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_migration_3_adds_the_identity_columns_and_the_outbox_to_a_version_2_database(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    database.migrate(MIGRATIONS)
    with database.engine.begin() as conn:  # roll the schema back to what version 2 created
        conn.execute(sa.text("DROP TABLE message_log_batches"))
        conn.execute(sa.text("ALTER TABLE send_ledger DROP COLUMN identity_namespace"))
        conn.execute(sa.text("ALTER TABLE send_ledger DROP COLUMN identity_value"))
        conn.execute(sa.text("DELETE FROM carillon_schema_migrations WHERE version >= 3"))
        conn.execute(
            sa.text(
                "INSERT INTO send_ledger (id, sandbox, campaign, run, activity, profile_key, entity_key, channel,"
                " status, reason, address, create_time, update_time, bounce_kind)"
                " VALUES ('old', 'prod', 'campaigns/c1', :run, 'a1', 'ada', '', 'email', 'sent', '', '',"
                " :now, :now, '')"
            ),
            {"run": RUN, "now": utcnow()},
        )

    applied = database.migrate(MIGRATIONS)

    ledger = Ledger(database, message_logs=True)
    (old,) = ledger.entries("prod", RUN, "a1")
    assert applied == [3, 4, 5, 6]
    assert (old.message_id, old.identity_namespace, old.identity_value) == ("old", "", "")
    ledger.write([entry("bob")], logs=[LogEvent("prod", "old", "delivered", utcnow())])
    assert [(w.message_id, w.status) for w in MessageLogOutbox(database).waiting()] == [("old", "delivered")]


def test_migration_6_moves_the_logs_queued_one_per_row_into_batches_and_drops_the_old_outbox(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    database.migrate(MIGRATIONS)
    ledger = Ledger(database, message_logs=True)
    ledger.write([entry(p) for p in ("ada", "bob", "cy")])
    ada, bob, cy = (entry(p).message_id for p in ("ada", "bob", "cy"))
    first, later = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    old_rows = [  # two sent in one batch, one opened later, after a failed attempt
        {"message_id": ada, "status": "sent", "event_time": first, "create_time": first, "attempts": 0},
        {"message_id": bob, "status": "sent", "event_time": first, "create_time": first, "attempts": 0},
        {"message_id": cy, "status": "opened", "event_time": later, "create_time": later, "attempts": 2},
    ]
    with database.engine.begin() as conn:  # roll back to version 5, with logs in the per-message outbox
        conn.execute(sa.text("DROP TABLE message_log_batches"))
        conn.execute(sa.text("DELETE FROM carillon_schema_migrations WHERE version = 6"))
        MessageLogOutboxRow.__table__.create(conn)  # type: ignore[attr-defined]
        conn.execute(
            MessageLogOutboxRow.__table__.insert(),  # type: ignore[attr-defined]
            [{"sandbox": "prod", "next_attempt_time": row["create_time"], **row} for row in old_rows],
        )

    applied = database.migrate(MIGRATIONS)

    assert applied == [6]
    assert not sa.inspect(database.engine).has_table("message_log_outbox", schema=database.schema)
    with database.engine.connect() as conn:
        batches = conn.execute(sa.text("SELECT status, size, attempts FROM message_log_batches ORDER BY id")).all()
    assert [tuple(b) for b in batches] == [("sent", 2, 0), ("opened", 1, 2)]
    due = MessageLogOutbox(database).due(100)
    assert [[(log.message_id, log.status, log.event_time) for log in b.logs] for b in due] == [
        [(ada, "sent", first), (bob, "sent", first)],
        [(cy, "opened", later)],
    ]


def test_finding_keys_looks_each_one_up_in_the_key_index_however_large_the_activity(database: Database) -> None:
    # A run's ledger grows faster than its statistics: the lookup of a batch's keys must not be
    # planned as a scan of the activity's every row (each batch then cost more than the one before).
    ledger = Ledger(database)
    ledger.write([entry(f"p{i:05d}") for i in range(3000)])
    statements: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        if "send_ledger" in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    sa.event.listen(database.engine, "before_cursor_execute", capture)
    try:
        found = ledger.find("prod", RUN, "a1", [(f"p{i:05d}", "") for i in range(2990, 3010)])
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", capture)
    ((statement, parameters),) = statements
    with database.engine.connect() as conn:
        if database.is_postgres:
            rows = conn.exec_driver_sql("EXPLAIN " + statement, parameters)  # type: ignore[arg-type]
            plan = "\n".join(row[0] for row in rows)
        else:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)  # type: ignore[arg-type]
            plan = "\n".join(row[-1] for row in rows)

    assert sorted(key for key, _ in found) == [f"p{i:05d}" for i in range(2990, 3000)]
    assert "uq_send_ledger_key" in plan or "sqlite_autoindex_send_ledger" in plan
    assert "Hash Join" not in plan and "Seq Scan on send_ledger" not in plan and "SCAN send_ledger" not in plan


def test_marking_a_batch_updates_its_rows_through_the_primary_key_not_a_scan_of_the_ledger(database: Database) -> None:
    # PostgreSQL's cost model prefers a scan of the whole ledger to a few hundred primary-key lookups
    # (so each batch of a send would cost more than the one before); the plan is read in the marking
    # transaction itself, with its settings.
    ledger = Ledger(database, message_logs=True)
    for start in range(0, 20_000, 5_000):
        ledger.write([entry(f"p{i:05d}") for i in range(start, start + 5_000)])
    if database.is_postgres:
        with database.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE send_ledger")
    ids = [entry(f"p{i:05d}").message_id for i in range(19_700, 20_000)]
    plans: list[str] = []

    def explain(conn: object, cursor: Any, statement: str, parameters: Any, *args: object) -> None:
        if not statement.lstrip().upper().startswith("UPDATE SEND_LEDGER"):
            return
        other = cursor.connection.cursor()
        other.execute(("EXPLAIN " if database.is_postgres else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plans.append("\n".join(str(row[0] if database.is_postgres else row[-1]) for row in other.fetchall()))

    sa.event.listen(database.engine, "after_cursor_execute", explain)
    try:
        ledger.mark([StatusChange(mid, "sent") for mid in ids])
    finally:
        sa.event.remove(database.engine, "after_cursor_execute", explain)

    assert plans
    assert all("Seq Scan" not in plan and "SCAN send_ledger" not in plan for plan in plans), plans
    assert {e.status for e in ledger.entries("prod", RUN, "a1") if e.message_id in set(ids)} == {"sent"}


@pytest.mark.parametrize("backend", ["postgresql"])  # page layout and heap-only updates are PostgreSQL's
def test_marking_rows_sent_keeps_each_row_in_its_page_so_no_index_entry_is_added(database: Database) -> None:
    # On PostgreSQL a status change that fits in the row's page is a heap-only update: neither index
    # gets an entry. Ledger pages keep room for it (migration 5); on full pages every new version
    # moved to another page, an index entry in each of the two indexes per message.
    ledger = Ledger(database, message_logs=True)
    ledger.write([entry(f"p{i:05d}") for i in range(3_000)])

    def pages() -> dict[str, str]:
        with database.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id, (ctid::text::point)[0]::text FROM send_ledger").fetchall()
        return {row[0]: row[1] for row in rows}

    before = pages()
    ledger.mark([StatusChange(entry(f"p{i:05d}").message_id, "sent") for i in range(3_000)])

    assert pages() == before
    assert {e.status for e in ledger.entries("prod", RUN, "a1")} == {"sent"}


def test_new_rows_are_inserted_without_a_conflict_check_unless_a_key_was_taken_meanwhile(database: Database) -> None:
    # The conflict check of ON CONFLICT DO NOTHING cost as much again as the insert: rows the caller
    # found missing are inserted plainly, and again with the check only when another writer took a key.
    ledger = Ledger(database)
    ledger.write([entry("ada")])
    inserts: list[bool] = []  # whether each insert checks for conflicts

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO SEND_LEDGER"):
            inserts.append("ON CONFLICT" in statement.upper())

    sa.event.listen(database.engine, "before_cursor_execute", seen)
    try:
        ledger.write([entry("bob"), entry("cy")])
        first = list(inserts)
        inserts.clear()
        ledger.write([entry("ada", status="skipped"), entry("dee")])  # ada's key is taken
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", seen)

    rows = {e.profile_key: e.status for e in ledger.entries("prod", RUN, "a1")}
    assert rows == {"ada": "pending", "bob": "pending", "cy": "pending", "dee": "pending"}
    if database.is_postgres:
        assert (first, inserts) == ([False], [False, True])
    else:
        assert first and all(inserts)
