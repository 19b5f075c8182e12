"""Regression tests for bugs found in review of delivery_svc and profile_stub (message-log outbox,
capping reservations, bulk statements). Every database-facing test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import FailedPrecondition, InvalidArgument
from delivery_svc.ledger import Ledger, LedgerEntry, LogEvent, StatusChange
from delivery_svc.message_logs import MessageLog, MessageLogFlusher, MessageLogOutbox
from delivery_svc.tables import MIGRATIONS, MessageLogBatchRow
from profile_stub.capping import CappingRule
from profile_stub.profiles import Communication, Consent, Eligibility, Profile, ProfileStore
from profile_stub.tables import MIGRATIONS as PROFILE_MIGRATIONS

OUTBOX: sa.Table = MessageLogBatchRow.__table__  # type: ignore[attr-defined]


@dataclass
class ShadowingSink:
    """Accepts logs, except those of the ``shadowed`` sandboxes (FAILED_PRECONDITION, as audience_svc
    answers for a sandbox whose user entity shadows message_logs)."""

    shadowed: set[str] = field(default_factory=set)
    accepted: list[tuple[str, str]] = field(default_factory=list)
    refusals: int = 0

    async def record(self, sandbox: str, logs: Sequence[MessageLog]) -> None:
        if sandbox in self.shadowed:
            self.refusals += 1
            raise FailedPrecondition("message_logs is shadowed", reason="MESSAGE_LOGS_SHADOWED")
        self.accepted += [(sandbox, entry.message_id) for entry in logs]


def sent_messages(database: Database, per_sandbox: dict[str, int]) -> None:
    """Sent messages ``<sandbox>-<i>`` with their ``sent`` logs queued, sandbox by sandbox in the given
    order (so the first sandbox's logs are the oldest)."""
    database.migrate(MIGRATIONS)
    ledger = Ledger(database, message_logs=True)
    for sandbox, count in per_sandbox.items():
        ids = [f"{sandbox}-{i}" for i in range(count)]
        ledger.write(
            [
                LedgerEntry(
                    message_id=mid,
                    sandbox=sandbox,
                    campaign="c",
                    run="r",
                    activity="a",
                    profile_key=f"p-{mid}",
                    entity_key="",
                    channel="email",
                    status="pending",
                    identity_namespace="email",
                    identity_value=f"{mid}@example.com",
                )
                for mid in ids
            ]
        )
        ledger.mark(
            [StatusChange(mid, "sent") for mid in ids], [LogEvent(sandbox, mid, "sent", utcnow()) for mid in ids]
        )


def outbox_rows(database: Database) -> dict[str, tuple[int, datetime]]:
    return {w.message_id: (w.attempts, w.next_attempt_time) for w in MessageLogOutbox(database).waiting()}


def make_due(database: Database) -> None:
    with database.engine.begin() as conn:
        conn.execute(OUTBOX.update().values(next_attempt_time=utcnow()))


async def test_a_shadowed_sandbox_does_not_hold_back_the_logs_of_other_sandboxes(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    sent_messages(database, {"shadow": 2, "prod": 2})
    sink = ShadowingSink(shadowed={"shadow"})
    flusher = MessageLogFlusher(database, sink, retry_initial_s=100, retry_max_s=1000)

    delivered = await flusher.flush()

    assert delivered == 2
    assert sorted(sink.accepted) == [("prod", "prod-0"), ("prod", "prod-1")]
    assert sorted(outbox_rows(database)) == ["shadow-0", "shadow-1"]


async def test_a_shadowed_sandbox_backs_off_even_while_other_sandboxes_succeed(
    make_database: Callable[[str], Database],
) -> None:
    database = make_database("delivery")
    sent_messages(database, {"shadow": 1, "prod": 1})
    sink = ShadowingSink(shadowed={"shadow"})
    flusher = MessageLogFlusher(database, sink, retry_initial_s=100, retry_max_s=10_000)
    await flusher.flush()
    sent_messages(database, {"prod2": 1})  # another sandbox keeps succeeding in between
    make_due(database)
    before = utcnow()

    await flusher.flush()

    attempts, next_attempt = outbox_rows(database)["shadow-0"]
    assert attempts == 2
    assert (next_attempt - before).total_seconds() >= 200  # the doubled delay, not the initial one again
    assert sorted(sink.accepted) == [("prod", "prod-0"), ("prod2", "prod2-0")]


# -- profile_stub: reservations -------------------------------------------------------------------
ANN = Profile("ann", [("crm_id", "c1"), ("email", "ann@example.com")], consents=[Consent("email", "opted_in", "form")])
BOB = Profile("bob", [("crm_id", "c2"), ("email", "bob@example.com")], consents=[Consent("email", "opted_in", "form")])
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(make_database: Callable[[str], Database]) -> ProfileStore:
    database = make_database("profile")
    database.migrate(PROFILE_MIGRATIONS)
    store = ProfileStore(database, reservation_ttl=timedelta(minutes=30))
    store.upsert_profiles("prod", [ANN, BOB])
    store.create_capping_rule("prod", CappingRule("daily", 1, "day", channel="email"))
    return store


def reserve(store: ProfileStore, crm_id: str, message_id: str) -> Eligibility:
    return store.check_eligibility(
        "prod", "email", "marketing", [("crm_id", crm_id)], reserve=True, message_ids=[message_id], now=NOW
    )[0]


def test_a_message_id_reserved_for_one_profile_does_not_let_another_profile_past_its_cap(
    store: ProfileStore,
) -> None:
    store.record_communications(
        "prod", [Communication("bob-earlier", "bob", "email", "marketing", send_time=NOW - timedelta(hours=1))]
    )
    assert reserve(store, "c1", "m1").verdict == "allowed"

    with pytest.raises(InvalidArgument) as refused:
        reserve(store, "c2", "m1")

    assert [v.field for v in refused.value.violations] == ["message_ids[0]"]
    assert reserve(store, "c2", "m2").verdict == "capped"  # bob's cap holds, nothing was reserved for him
    assert reserve(store, "c1", "m1").reserved  # ann keeps her reservation


# -- bad input is INVALID_ARGUMENT, not a database error (PostgreSQL text cannot hold NUL) ---------------
def test_an_identity_with_a_nul_character_is_refused_naming_it(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as refused:
        store.check_eligibility("prod", "email", "marketing", [("crm_id", "c1"), ("crm_id", "c\x002")])

    assert [v.field for v in refused.value.violations] == ["identities[1]"]


def test_a_reservation_message_id_with_a_nul_character_is_refused_and_nothing_is_reserved(
    store: ProfileStore,
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        reserve(store, "c1", "m\x001")

    assert [v.field for v in refused.value.violations] == ["message_ids[0]"]
    assert reserve(store, "c1", "m1").verdict == "allowed"


def test_releasing_a_message_id_with_a_nul_character_is_refused(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as refused:
        store.release_reservations("prod", ["m1", "m\x002"])

    assert [v.field for v in refused.value.violations] == ["message_ids[1]"]


def test_a_communication_with_a_nul_character_is_refused_and_nothing_is_recorded(store: ProfileStore) -> None:
    with pytest.raises(InvalidArgument) as refused:
        store.record_communications(
            "prod", [Communication("m1", "ann", "email", "marketing", campaign="c\x00", send_time=NOW)]
        )

    assert [v.field for v in refused.value.violations] == ["communications[0].campaign"]
    assert store.history("prod", "ann") == []
