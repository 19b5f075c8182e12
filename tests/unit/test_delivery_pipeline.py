"""The send pipeline with a fake eligibility gateway and a fake provider over an embedded ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from carillon_chassis.messages import message_id
from delivery_svc.eligibility import Communication, Identity, ProfileView, Verdict
from delivery_svc.emails import MESSAGE_ID_HEADER, OutgoingEmail
from delivery_svc.ledger import Ledger, LedgerEntry
from delivery_svc.pipeline import BatchAck, DeliveryPipeline, Recipient, SendHeader
from delivery_svc.providers import (
    PermanentProviderError,
    ProviderUnavailableError,
    RetryPolicy,
    TransientProviderError,
)
from delivery_svc.tables import MIGRATIONS, TemplateRow
from delivery_svc.templates import Template, TemplateStore

SANDBOX = "prod"
HEADER = SendHeader(
    campaign="campaigns/spring",
    run="campaigns/spring/runs/r1",
    activity="email1",
    channel="email",
    category="marketing",
    template="templates/welcome",
)


class Crash(Exception):
    """Stands for the process dying in the middle of a send."""


def allowed(address: str, profile_id: str, first_name: str = "") -> Verdict:
    view = ProfileView(profile_id=profile_id, first_name=first_name, identities=(("email", address),))
    return Verdict(("email", address), "allowed", view, address)


@dataclass
class FakeGateway:
    """Verdicts by identity (unknown identities get ``unknown_profile``), capping reservations modelled
    as profile_stub keeps them (a message id reserved or recorded already is allowed again, even when
    its profile is capped), and the recorded history."""

    verdicts: dict[Identity, Verdict] = field(default_factory=dict)
    checks: list[list[Identity]] = field(default_factory=list)
    recorded: list[Communication] = field(default_factory=list)
    unreachable: bool = False
    history_down: bool = False
    # The message ids each reserving check held (new or earlier reservations), one list per call.
    reservations: list[list[str]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    live: set[str] = field(default_factory=set)  # reservations neither released nor recorded
    # Identities whose cap a concurrent send took: capped, unless their message is reserved already.
    capped: set[Identity] = field(default_factory=set)
    # Answers as a profile service that ignores the reservation request (an older version).
    ignores_reservations: bool = False
    other_message_ids: bool = False  # reserves under ids that are not the ledger's
    # When set, a reserving check reserves at once but answers only once it is set: a profile_stub that
    # committed its reservations while its answer was still on the way.
    answer: asyncio.Event | None = None

    def allow(self, address: str, profile_id: str, first_name: str = "") -> None:
        self.verdicts[("email", address)] = allowed(address, profile_id, first_name)

    def refuse(self, address: str, verdict: str, profile_id: str | None = None) -> None:
        view = ProfileView(profile_id=profile_id) if profile_id else None
        self.verdicts[("email", address)] = Verdict(("email", address), verdict, view)

    async def check(self, sandbox: str, channel: str, category: str, identities: Sequence[Identity]) -> list[Verdict]:
        if self.unreachable:
            raise Unavailable("profile service down", reason="PROFILE_UNAVAILABLE")
        self.checks.append(list(identities))
        return [self.verdicts.get(i, Verdict(i, "unknown_profile")) for i in identities]

    async def check_and_reserve(
        self,
        sandbox: str,
        channel: str,
        identities: Sequence[Identity],
        run: str,
        activity: str,
        entity_keys: Sequence[str],
    ) -> list[Verdict]:
        verdicts = await self.check(sandbox, channel, "marketing", identities)
        if self.ignores_reservations:
            return verdicts
        recorded = {c.message_id for c in self.recorded}
        results, held = [], []
        for verdict, entity_key in zip(verdicts, entity_keys, strict=True):
            if verdict.verdict not in ("allowed", "capped") or verdict.profile is None:
                results.append(verdict)
                continue
            mid = message_id(sandbox, run, activity, verdict.profile.profile_id, entity_key)
            if mid not in self.live and mid not in recorded:
                if verdict.verdict == "capped" or verdict.identity in self.capped:
                    results.append(Verdict(verdict.identity, "capped", verdict.profile))
                    continue
                self.live.add(mid)
            held.append(mid)
            address = verdict.address or verdict.identity[1]
            reserved_id = mid + "x" if self.other_message_ids else mid
            results.append(replace(verdict, verdict="allowed", address=address, reserved=True, message_id=reserved_id))
        self.reservations.append(held)
        if self.answer is not None:
            await self.answer.wait()
        return results

    async def release(self, sandbox: str, message_ids: Sequence[str]) -> int:
        self.released.extend(message_ids)
        self.live.difference_update(message_ids)
        return len(message_ids)

    async def record(self, sandbox: str, communications: Sequence[Communication]) -> int:
        if self.history_down:
            raise Unavailable("profile service down", reason="PROFILE_UNAVAILABLE")
        self.recorded.extend(communications)
        self.live.difference_update(c.message_id for c in communications)
        return len(communications)


@dataclass
class FakeProvider:
    """Collects sent emails; ``errors`` maps a recipient to the errors its next attempts raise;
    ``mark_each_send`` as in SmtpProvider."""

    sent: list[OutgoingEmail] = field(default_factory=list)
    errors: dict[str, list[Exception]] = field(default_factory=dict)
    attempts: int = 0
    mark_each_send: bool = False

    def open(self) -> FakeProvider:
        return self

    def send(self, message: OutgoingEmail) -> None:
        self.attempts += 1
        queued = self.errors.get(message.recipient)
        if queued:
            raise queued.pop(0)
        self.sent.append(message)

    def close(self) -> None:
        pass

    def recipients(self) -> list[str]:
        return [m.recipient for m in self.sent]


@dataclass
class Harness:
    database: Database
    gateway: FakeGateway
    provider: FakeProvider
    pipeline: DeliveryPipeline
    ledger: Ledger

    async def deliver(
        self, recipients: Iterable[Recipient], sequence: int = 1, header: SendHeader = HEADER
    ) -> BatchAck:
        session = await self.pipeline.open(SANDBOX, header)
        return await session.deliver(sequence, list(recipients))

    def rows(self) -> dict[str, LedgerEntry]:
        return {
            e.profile_key + "/" + e.entity_key: e for e in self.ledger.entries(SANDBOX, HEADER.run, HEADER.activity)
        }


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    database = Database(f"sqlite:///{tmp_path / 'delivery.db'}", threads=2)
    database.migrate(MIGRATIONS)
    templates = TemplateStore(database)
    templates.create(
        SANDBOX,
        "welcome",
        Template(
            template_id="",
            channel="email",
            content_kind="email",
            content={
                "subject": "Welcome {{ profile.first_name | default('friend') }}",
                "text_body": "Hello {{ profile.first_name }}, {{ target.hotel }}",
            },
        ),
    )
    gateway, provider, ledger = FakeGateway(), FakeProvider(), Ledger(database)
    pipeline = DeliveryPipeline(
        database=database,
        templates=templates,
        ledger=ledger,
        gateway=gateway,
        provider=provider,
        channel="email",
        max_batch=5,
        sender_name="Carillon",
        sender_address="news@example.com",
        retry=RetryPolicy(attempts=3, initial_s=0, max_s=0),
    )
    yield Harness(database, gateway, provider, pipeline, ledger)
    database.close()


def to(address: str, entity_key: str = "", target: dict[str, object] | None = None) -> Recipient:
    return Recipient("email", address, entity_key, {"hotel": "Ritz"} if target is None else target)


async def test_an_eligible_recipient_gets_one_personalised_email(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada", "Ada")

    ack = await harness.deliver([to("ada@example.com", target={"hotel": "Ritz"})])

    assert (ack.sent, ack.already_sent, dict(ack.skipped), dict(ack.failed)) == (1, 0, {}, {})
    (message,) = harness.provider.sent
    assert message.recipient == "ada@example.com"
    assert b"Hello Ada, Ritz" in message.data
    assert harness.rows()["ada/"].status == "sent"


async def test_ineligible_recipients_are_skipped_with_their_reasons(harness: Harness) -> None:
    harness.gateway.allow("ok@example.com", "ok")
    harness.gateway.refuse("out@example.com", "no_consent", "out")
    harness.gateway.refuse("bounced@example.com", "quarantined", "bounced")
    harness.gateway.refuse("busy@example.com", "capped", "busy")
    harness.gateway.refuse("nomail@example.com", "missing_address", "nomail")

    ack = await harness.deliver(
        [to(a) for a in ("ok@example.com", "out@example.com", "bounced@example.com", "busy@example.com")]
        + [to("nomail@example.com")]
    )
    ack_unknown = await harness.deliver([to("stranger@example.com")], sequence=2)

    assert ack.sent == 1
    assert dict(ack.skipped) == {"NO_CONSENT": 1, "QUARANTINED": 1, "CAPPED": 1, "MISSING_ADDRESS": 1}
    assert dict(ack_unknown.skipped) == {"UNKNOWN_PROFILE": 1}
    assert harness.provider.recipients() == ["ok@example.com"]
    rows = harness.rows()
    assert {key: (row.status, row.reason) for key, row in rows.items()} == {
        "ok/": ("sent", ""),
        "out/": ("skipped", "NO_CONSENT"),
        "bounced/": ("skipped", "QUARANTINED"),
        "busy/": ("skipped", "CAPPED"),
        "nomail/": ("skipped", "MISSING_ADDRESS"),
        "email:stranger@example.com/": ("skipped", "UNKNOWN_PROFILE"),
    }


async def test_a_replayed_batch_sends_nothing_new_and_reports_already_sent(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    batch = [to("ada@example.com"), to("bob@example.com")]
    await harness.deliver(batch)

    replay = await harness.deliver(batch)

    assert (replay.sent, replay.already_sent) == (0, 2)
    assert len(harness.provider.sent) == 2


async def test_a_replayed_batch_reports_recorded_skip_reasons_again(harness: Harness) -> None:
    harness.gateway.refuse("out@example.com", "no_consent", "out")
    await harness.deliver([to("out@example.com")])
    harness.gateway.allow("out@example.com", "out")

    replay = await harness.deliver([to("out@example.com")])

    assert dict(replay.skipped) == {"NO_CONSENT": 1}
    assert harness.provider.sent == []


async def test_a_pending_ledger_row_is_resent_with_the_same_message_id(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [Crash("killed between the ledger write and the send")]
    with pytest.raises(Crash):
        await harness.deliver([to("ada@example.com")])
    pending = harness.rows()["ada/"]
    assert pending.status == "pending"

    ack = await harness.deliver([to("ada@example.com")])

    assert ack.sent == 1
    (message,) = harness.provider.sent
    assert message.message_id == pending.message_id
    assert f"{MESSAGE_ID_HEADER}: {pending.message_id}".encode() in message.data
    assert f"Message-ID: <{pending.message_id}@carillon>".encode() in message.data
    assert harness.rows()["ada/"].status == "sent"


async def test_a_pending_row_of_a_recipient_no_longer_eligible_is_skipped(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [Crash()]
    with pytest.raises(Crash):
        await harness.deliver([to("ada@example.com")])
    harness.gateway.refuse("ada@example.com", "no_consent", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    assert dict(ack.skipped) == {"NO_CONSENT": 1}
    assert harness.provider.sent == []
    assert (harness.rows()["ada/"].status, harness.rows()["ada/"].reason) == ("skipped", "NO_CONSENT")


async def test_a_render_failure_skips_only_that_recipient(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada", "Ada")
    harness.gateway.allow("bob@example.com", "bob", "Bob")

    ack = await harness.deliver([to("ada@example.com"), to("bob@example.com", target={})])

    assert ack.sent == 1
    assert dict(ack.skipped) == {"RENDER_ERROR": 1}
    assert harness.provider.recipients() == ["ada@example.com"]
    assert (harness.rows()["bob/"].status, harness.rows()["bob/"].reason) == ("skipped", "RENDER_ERROR")


async def test_a_recipient_with_an_unusable_address_is_skipped(harness: Harness) -> None:
    harness.gateway.verdicts[("email", "eve")] = allowed("eve@example.com>\r\nBcc: x@example.com", "eve")

    ack = await harness.deliver([to("eve")])

    assert dict(ack.skipped) == {"INVALID_ADDRESS": 1}
    assert harness.provider.sent == []


async def test_the_same_recipient_twice_in_a_batch_gets_one_message(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")

    ack = await harness.deliver([to("ada@example.com", "r1"), to("ada@example.com", "r1")])

    assert (ack.sent, dict(ack.skipped)) == (1, {"DUPLICATE": 1})
    assert len(harness.provider.sent) == 1


async def test_each_entity_key_of_a_profile_gets_its_own_message(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada", "Ada")

    ack = await harness.deliver(
        [to("ada@example.com", "r1", {"hotel": "Ritz"}), to("ada@example.com", "r2", {"hotel": "Savoy"})]
    )

    assert ack.sent == 2
    bodies = [m.data for m in harness.provider.sent]
    assert any(b"Ritz" in b for b in bodies)
    assert any(b"Savoy" in b for b in bodies)
    assert set(harness.rows()) == {"ada/r1", "ada/r2"}


async def test_a_permanent_provider_error_fails_only_that_message_once(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [PermanentProviderError("550 no such user")]

    ack = await harness.deliver([to("ada@example.com"), to("bob@example.com")])
    replay = await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert (ack.sent, dict(ack.failed)) == (1, {"PROVIDER_PERMANENT": 1})
    assert harness.provider.attempts == 2
    assert (replay.sent, replay.already_sent, dict(replay.failed)) == (0, 1, {"PROVIDER_PERMANENT": 1})
    assert (harness.rows()["bob/"].status, harness.rows()["bob/"].reason) == ("failed", "PROVIDER_PERMANENT")


async def test_a_transient_provider_error_is_retried(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [TransientProviderError("451 try later")]

    ack = await harness.deliver([to("ada@example.com")])

    assert ack.sent == 1
    assert harness.provider.attempts == 2


async def test_an_unavailable_provider_fails_the_batch_and_leaves_its_messages_pending(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [ProviderUnavailableError("connection refused")] * 3
    batch = [to("ada@example.com"), to("bob@example.com")]

    with pytest.raises(Unavailable) as caught:
        await harness.deliver(batch)
    statuses = {k: r.status for k, r in harness.rows().items()}
    replay = await harness.deliver(batch)

    assert caught.value.reason == "PROVIDER_UNAVAILABLE"
    assert statuses == {"ada/": "sent", "bob/": "pending"}
    assert (replay.sent, replay.already_sent) == (1, 1)
    assert harness.provider.recipients() == ["ada@example.com", "bob@example.com"]


async def test_a_crash_mid_batch_leaves_every_accepted_message_pending_by_default(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [Crash("killed")]

    with pytest.raises(Crash):
        await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert {k: r.status for k, r in harness.rows().items()} == {"ada/": "pending", "bob/": "pending"}
    assert harness.provider.recipients() == ["ada@example.com"]


async def test_a_provider_marking_each_send_has_its_accepted_messages_sent_before_a_crash(harness: Harness) -> None:
    harness.provider.mark_each_send = True
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [Crash("killed")]
    batch = [to("ada@example.com"), to("bob@example.com")]

    with pytest.raises(Crash):
        await harness.deliver(batch)
    statuses = {k: r.status for k, r in harness.rows().items()}
    replay = await harness.deliver(batch)

    assert statuses == {"ada/": "sent", "bob/": "pending"}
    assert (replay.sent, replay.already_sent) == (1, 1)
    assert harness.provider.recipients() == ["ada@example.com", "bob@example.com"]


async def test_a_provider_marking_each_send_acknowledges_and_records_the_batch_as_usual(harness: Harness) -> None:
    harness.provider.mark_each_send = True
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [PermanentProviderError("550 no such user")]

    ack = await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert (ack.sent, ack.already_sent, dict(ack.failed)) == (1, 0, {"PROVIDER_PERMANENT": 1})
    assert {k: (r.status, r.reason) for k, r in harness.rows().items()} == {
        "ada/": ("sent", ""),
        "bob/": ("failed", "PROVIDER_PERMANENT"),
    }
    assert [c.message_id for c in harness.gateway.recorded] == [harness.rows()["ada/"].message_id]


async def test_sent_messages_are_recorded_as_communications(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.refuse("out@example.com", "no_consent", "out")

    await harness.deliver([to("ada@example.com"), to("out@example.com")])

    (communication,) = harness.gateway.recorded
    assert communication.message_id == harness.rows()["ada/"].message_id
    assert communication.profile_id == "ada"
    assert (communication.campaign, communication.run, communication.activity) == (
        HEADER.campaign,
        HEADER.run,
        HEADER.activity,
    )
    assert (communication.channel, communication.category) == ("email", "marketing")


async def test_a_replay_records_the_communications_a_failed_attempt_could_not_record(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.history_down = True
    with pytest.raises(Unavailable):
        await harness.deliver([to("ada@example.com")])
    harness.gateway.history_down = False

    replay = await harness.deliver([to("ada@example.com")])

    assert (replay.sent, replay.already_sent) == (0, 1)
    assert len(harness.provider.sent) == 1
    assert [c.message_id for c in harness.gateway.recorded] == [harness.rows()["ada/"].message_id]


async def test_the_batch_is_checked_in_one_eligibility_call(harness: Harness) -> None:
    await harness.deliver([to(f"p{i}@example.com") for i in range(5)])

    assert len(harness.gateway.checks) == 1


async def test_a_batch_larger_than_the_limit_is_refused_before_any_work(harness: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await harness.deliver([to(f"p{i}@example.com") for i in range(6)])

    assert caught.value.reason == "BATCH_TOO_LARGE"
    assert harness.gateway.checks == []


async def test_a_recipient_without_an_identity_value_is_refused(harness: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await harness.deliver([to("ada@example.com"), Recipient("email", "")])

    assert [v.field for v in caught.value.violations] == ["batch.recipients[1].identity"]
    assert harness.rows() == {}


async def test_an_unreachable_profile_service_fails_the_batch_and_writes_nothing(harness: Harness) -> None:
    harness.gateway.unreachable = True

    with pytest.raises(Unavailable):
        await harness.deliver([to("ada@example.com")])

    assert harness.rows() == {}


async def test_a_header_for_another_channel_is_refused(harness: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await harness.pipeline.open(SANDBOX, _header(channel="sms"))

    assert [v.field for v in caught.value.violations] == ["header.channel"]


async def test_a_header_without_a_category_is_refused(harness: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await harness.pipeline.open(SANDBOX, _header(category=""))

    assert [v.field for v in caught.value.violations] == ["header.category"]


async def test_a_header_with_a_run_of_another_campaign_is_refused(harness: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await harness.pipeline.open(SANDBOX, _header(run="campaigns/autumn/runs/r1"))

    assert [v.field for v in caught.value.violations] == ["header.run"]


async def test_an_unknown_template_is_not_found(harness: Harness) -> None:
    with pytest.raises(NotFound) as caught:
        await harness.pipeline.open(SANDBOX, _header(template="templates/missing"))

    assert [v.field for v in caught.value.violations] == ["header.template"]


async def test_a_template_of_another_channel_is_a_failed_precondition(harness: Harness) -> None:
    with harness.database.engine.begin() as conn:
        conn.execute(
            sa.insert(TemplateRow.__table__).values(  # type: ignore[attr-defined]
                sandbox=SANDBOX,
                template_id="texting",
                channel="sms",
                display_name="",
                content={"kind": "sms", "body": "hi"},
                create_time=utcnow(),
            )
        )

    with pytest.raises(FailedPrecondition) as caught:
        await harness.pipeline.open(SANDBOX, _header(template="templates/texting"))

    assert caught.value.reason == "TEMPLATE_CHANNEL_MISMATCH"


def _header(**changes: str) -> SendHeader:
    values = {**HEADER.__dict__, **changes}
    return SendHeader(**values)


# -- capping reservations: made by the marketing check ---------------------------------------------


async def test_a_marketing_batch_reserves_exactly_the_messages_it_is_about_to_send(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.gateway.refuse("out@example.com", "no_consent", "out")

    await harness.deliver([to("ada@example.com"), to("bob@example.com"), to("out@example.com")])

    rows = harness.rows()
    assert harness.gateway.reservations == [[rows["ada/"].message_id, rows["bob/"].message_id]]
    assert [c.message_id for c in harness.gateway.recorded] == [rows["ada/"].message_id, rows["bob/"].message_id]


async def test_a_recipient_capped_at_reservation_time_is_skipped_and_not_sent(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.gateway.capped.add(("email", "bob@example.com"))

    ack = await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert (ack.sent, dict(ack.skipped)) == (1, {"CAPPED": 1})
    assert harness.provider.recipients() == ["ada@example.com"]
    assert (harness.rows()["bob/"].status, harness.rows()["bob/"].reason) == ("skipped", "CAPPED")


async def test_a_transactional_batch_reserves_nothing(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")

    ack = await harness.deliver([to("ada@example.com")], header=_header(category="transactional"))

    assert ack.sent == 1
    assert harness.gateway.reservations == []


async def test_the_reservation_of_a_message_that_does_not_render_is_released(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")

    ack = await harness.deliver([to("ada@example.com", target={})])

    assert dict(ack.skipped) == {"RENDER_ERROR": 1}
    assert harness.gateway.released == [harness.rows()["ada/"].message_id]


async def test_the_reservation_of_a_message_the_provider_refuses_is_released(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.allow("bob@example.com", "bob")
    harness.provider.errors["bob@example.com"] = [PermanentProviderError("550 no such user")]

    await harness.deliver([to("ada@example.com"), to("bob@example.com")])

    assert harness.gateway.released == [harness.rows()["bob/"].message_id]


async def test_the_reservation_of_a_message_that_failed_transiently_is_released(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [TransientProviderError("451 try later")] * 3

    ack = await harness.deliver([to("ada@example.com")])

    assert dict(ack.failed) == {"PROVIDER_TRANSIENT": 1}
    assert harness.gateway.released == [harness.rows()["ada/"].message_id]


async def test_a_replayed_pending_message_reserves_again_under_the_same_message_id(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [RuntimeError("killed between the ledger write and the send")]
    with pytest.raises(RuntimeError):
        await harness.deliver([to("ada@example.com")])

    ack = await harness.deliver([to("ada@example.com")])

    mid = harness.rows()["ada/"].message_id
    assert ack.sent == 1
    assert harness.gateway.reservations == [[mid], [mid]]
    assert harness.gateway.released == []


async def test_a_pending_message_capped_only_by_its_own_reservation_is_sent_on_replay(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.provider.errors["ada@example.com"] = [RuntimeError("killed between the ledger write and the send")]
    with pytest.raises(RuntimeError):
        await harness.deliver([to("ada@example.com")])
    # The profile is now at a cap of one, counting the message's own live reservation: the reserving
    # check knows the message id and allows it without counting it twice.
    harness.gateway.refuse("ada@example.com", "capped", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    assert (ack.sent, dict(ack.skipped)) == (1, {})
    assert harness.provider.recipients() == ["ada@example.com"]


async def test_a_new_message_capped_in_the_check_and_at_reservation_is_skipped_and_not_sent(harness: Harness) -> None:
    harness.gateway.refuse("ada@example.com", "capped", "ada")

    ack = await harness.deliver([to("ada@example.com")])

    assert dict(ack.skipped) == {"CAPPED": 1}
    assert harness.gateway.reservations == [[]]
    assert (harness.provider.recipients(), harness.gateway.released) == ([], [])


async def test_a_replay_releases_the_reservation_of_a_message_its_ledger_shows_skipped(harness: Harness) -> None:
    harness.gateway.refuse("ada@example.com", "no_consent", "ada")
    await harness.deliver([to("ada@example.com")])
    harness.gateway.allow("ada@example.com", "ada")  # consent given since: the check reserves again

    ack = await harness.deliver([to("ada@example.com")])

    mid = harness.rows()["ada/"].message_id
    assert (ack.sent, dict(ack.skipped)) == (0, {"NO_CONSENT": 1})  # the recorded outcome stands
    assert harness.gateway.reservations == [[], [mid]]
    assert (harness.gateway.released, harness.gateway.live) == ([mid], set())


async def test_an_already_sent_message_keeps_its_reservation_as_its_communication(harness: Harness) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    await harness.deliver([to("ada@example.com")])

    ack = await harness.deliver([to("ada@example.com")])

    assert (ack.sent, ack.already_sent) == (0, 1)
    assert harness.gateway.released == []
    assert [c.message_id for c in harness.gateway.recorded] == [harness.rows()["ada/"].message_id] * 2


async def test_a_profile_service_that_allows_marketing_without_reserving_fails_the_batch_unsent(
    harness: Harness,
) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.ignores_reservations = True

    with pytest.raises(Unavailable) as failed:
        await harness.deliver([to("ada@example.com")])

    assert failed.value.reason == "PROFILE_BAD_RESPONSE"
    assert (harness.provider.recipients(), harness.rows()) == ([], {})


async def test_a_reservation_under_another_message_id_than_the_ledgers_fails_the_batch_unsent(
    harness: Harness,
) -> None:
    harness.gateway.allow("ada@example.com", "ada")
    harness.gateway.other_message_ids = True

    with pytest.raises(Unavailable) as failed:
        await harness.deliver([to("ada@example.com")])

    assert failed.value.reason == "PROFILE_BAD_RESPONSE"
    assert (harness.provider.recipients(), harness.rows()) == ([], {})


async def test_a_transactional_pending_row_under_an_older_message_id_is_sent_under_that_id(harness: Harness) -> None:
    # Messages are rendered ahead under the id derived from their key; a ledger row holding another id
    # (written by an older version, say) keeps its own: the message is rendered again under it.
    harness.gateway.allow("ada@example.com", "ada")
    header = _header(category="transactional")
    entry = LedgerEntry(
        message_id="mlegacy0001",
        sandbox=SANDBOX,
        campaign=header.campaign,
        run=header.run,
        activity=header.activity,
        profile_key="ada",
        entity_key="",
        channel="email",
        status="pending",
        address="ada@example.com",
    )
    harness.ledger.write([entry])

    ack = await harness.deliver([to("ada@example.com")], header=header)

    assert ack.sent == 1
    (message,) = harness.provider.sent
    assert message.message_id == "mlegacy0001"
    assert b"Message-ID: <mlegacy0001@carillon>" in message.data
