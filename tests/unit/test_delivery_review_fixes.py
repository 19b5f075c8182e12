"""Regression tests for bugs found in review of the send pipeline's capping reservations (fake
eligibility gateway and provider over an embedded ledger, the harness of test_delivery_pipeline)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from carillon_chassis.errors import InvalidArgument, Unavailable
from delivery_svc.feedback import FeedbackService, FeedbackTarget, IncomingEvent
from delivery_svc.ledger import Ledger, LedgerEntry, LogEvent, StatusChange
from delivery_svc.providers import ProviderUnavailableError
from tests.unit.test_delivery_pipeline import Crash, Harness, harness, to

__all__ = ["harness"]  # the fixture, used by name


class LedgerDownOnWrite(Ledger):
    """A ledger whose next write fails (the database gone, or the process killed, before it commits)."""

    def write(
        self, entries: Sequence[LedgerEntry], changes: Sequence[StatusChange] = (), logs: Sequence[LogEvent] = ()
    ) -> None:
        raise Crash("killed between the reservation and the ledger write")


async def test_a_new_message_capped_only_by_its_own_reservation_from_a_crashed_attempt_is_sent_on_replay(
    harness: Harness,
) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    real_ledger = harness.pipeline.ledger
    harness.pipeline.ledger = LedgerDownOnWrite(harness.database)
    with pytest.raises(Crash):
        await harness.deliver([to("ada@example.com")])
    harness.pipeline.ledger = real_ledger
    # The crashed attempt reserved the message but wrote no ledger row. The profile is now at a cap of
    # one counting that live reservation; the reserving check knows the message id and allows it.
    harness.gateway.refuse("ada@example.com", "capped", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    mid = harness.rows()["ada/"].message_id
    assert (ack.sent, dict(ack.skipped)) == (1, {})
    assert harness.provider.recipients() == ["ada@example.com"]
    assert harness.gateway.reservations == [[mid], [mid]]


async def test_the_reservation_of_a_crashed_attempt_is_released_when_the_replay_skips_the_message(
    harness: Harness,
) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [Crash("killed between the ledger write and the send")]
    with pytest.raises(Crash):
        await harness.deliver([to("ada@example.com")])
    assert harness.gateway.released == []
    harness.gateway.refuse("ada@example.com", "no_consent", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    assert dict(ack.skipped) == {"NO_CONSENT": 1}
    assert harness.gateway.released == [harness.rows()["ada/"].message_id]


async def test_a_message_skipped_on_its_first_attempt_releases_nothing(harness: Harness) -> None:
    harness.gateway.refuse("ada@example.com", "no_consent", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    assert dict(ack.skipped) == {"NO_CONSENT": 1}
    assert harness.gateway.released == []


async def test_a_recipient_whose_identity_or_entity_key_holds_a_nul_character_is_refused(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")

    with pytest.raises(InvalidArgument) as refused:
        await harness.deliver([to("ada@example.com"), to("b\x00b@example.com"), to("ada@example.com", "k\x00")])

    assert [v.field for v in refused.value.violations] == [
        "batch.recipients[1].identity",
        "batch.recipients[2].entity_key",
    ]
    assert (harness.gateway.checks, harness.rows()) == ([], {})


class NoForwarding:
    """A feedback forwarder that keeps what it is given."""

    def __init__(self) -> None:
        self.forwarded: list[FeedbackTarget] = []

    async def forward(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        self.forwarded += targets


async def test_feedback_with_a_nul_character_is_refused_naming_the_field_and_nothing_is_recorded(
    harness: Harness,
) -> None:
    forwarder = NoForwarding()
    feedback = FeedbackService(harness.database, harness.ledger, forwarder)

    with pytest.raises(InvalidArgument) as refused:
        await feedback.record(
            "prod",
            [IncomingEvent("e\x001", "m1", "opened"), IncomingEvent("e2", "m1", "hard_bounce", detail="5.1.1\x00")],
        )

    assert [v.field for v in refused.value.violations] == ["events[0].event_id", "events[1].detail"]
    assert forwarder.forwarded == []


async def test_messages_sent_before_the_provider_became_unavailable_are_recorded_before_the_batch_fails(
    harness: Harness,
) -> None:
    # Their reservations expire on their own: unrecorded, a send the stream never replays would stop
    # counting against the caps after the reservation's lifetime.
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [ProviderUnavailableError("connection refused")] * 3

    with pytest.raises(Unavailable):
        await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert [(c.message_id, c.profile_id) for c in harness.gateway.recorded] == [
        (harness.rows()["ada/"].message_id, "ada")
    ]
