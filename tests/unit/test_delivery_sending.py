"""Throttling, send windows and retries of the send pipeline, on a fake clock (no wall-clock time).

The fake clock's ``sleep`` advances simulated time instead of waiting, so rate limits and backoff are
asserted on the times at which the fake provider saw each send.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import InvalidArgument
from delivery_svc.eligibility import ProfileView, Verdict
from delivery_svc.emails import OutgoingEmail
from delivery_svc.ledger import FeedbackTarget, Ledger
from delivery_svc.pipeline import BatchAck, DeliveryPipeline, Recipient, SendHeader
from delivery_svc.providers import PermanentProviderError, RetryPolicy, TransientProviderError
from delivery_svc.tables import MIGRATIONS
from delivery_svc.templates import Template, TemplateStore
from delivery_svc.windows import SendWindow
from tests.unit.test_delivery_pipeline import FakeGateway

SANDBOX = "prod"
HEADER = SendHeader(
    campaign="campaigns/spring",
    run="campaigns/spring/runs/r1",
    activity="email1",
    channel="email",
    category="marketing",
    template="templates/hello",
)


class FakeClock:
    """Simulated time: ``sleep`` advances it at once."""

    def __init__(self, start: datetime) -> None:
        self._lock = threading.Lock()
        self._start = start
        self._elapsed = 0.0

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._elapsed += max(0.0, seconds)

    def advance(self, delta: timedelta) -> None:
        self.sleep(delta.total_seconds())


@dataclass
class TimedProvider:
    """Records each send with the simulated time; may fail some sends transiently or permanently."""

    clock: FakeClock
    sent: list[tuple[float, OutgoingEmail]] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    transient_rate: float = 0.0
    permanent: set[str] = field(default_factory=set)
    rng: random.Random = field(default_factory=lambda: random.Random(20261129))
    transient_failures: int = 0

    def open(self) -> TimedProvider:
        return self

    def send(self, message: OutgoingEmail) -> None:
        self.attempts[message.recipient] += 1
        if message.recipient in self.permanent:
            raise PermanentProviderError("550 no such user")
        if self.rng.random() < self.transient_rate:
            self.transient_failures += 1
            raise TransientProviderError("451 try again later")
        self.sent.append((self.clock.monotonic(), message))

    def close(self) -> None:
        pass

    def recipients(self) -> list[str]:
        return [m.recipient for _, m in self.sent]

    def times(self) -> list[float]:
        return [t for t, _ in self.sent]


@dataclass
class Rig:
    clock: FakeClock
    gateway: FakeGateway
    provider: TimedProvider
    pipeline: DeliveryPipeline
    ledger: Ledger

    async def deliver(
        self, recipients: Iterable[Recipient], header: SendHeader = HEADER, sequence: int = 1
    ) -> BatchAck:
        session = await self.pipeline.open(SANDBOX, header)
        return await session.deliver(sequence, list(recipients))

    def allow(self, address: str, time_zone: str = "") -> None:
        view = ProfileView(profile_id=address.split("@")[0], time_zone=time_zone, identities=(("email", address),))
        self.gateway.verdicts[("email", address)] = Verdict(("email", address), "allowed", view, address)


async def make_rig(tmp_path: Path, *, provider_rate: float = 0, attempts: int = 3) -> tuple[Rig, Database]:
    database = Database(f"sqlite:///{tmp_path / 'delivery.db'}", threads=2)
    database.migrate(MIGRATIONS)
    templates = TemplateStore(database)
    templates.create(
        SANDBOX,
        "hello",
        Template(template_id="", channel="email", content_kind="email", content={"subject": "Hi", "text_body": "Hi"}),
    )
    clock = FakeClock(utcnow())
    gateway, provider, ledger = FakeGateway(), TimedProvider(clock), Ledger(database)
    pipeline = DeliveryPipeline(
        database=database,
        templates=templates,
        ledger=ledger,
        gateway=gateway,
        provider=provider,
        channel="email",
        max_batch=1000,
        sender_name="Carillon",
        sender_address="news@example.com",
        retry=RetryPolicy(attempts=attempts, initial_s=0.5, max_s=4.0, window=timedelta(hours=84)),
        clock=clock,
        provider_rate=provider_rate,
    )
    return Rig(clock, gateway, provider, pipeline, ledger), database


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made, database = await make_rig(tmp_path)
    yield made
    database.close()


def people(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


def to(address: str) -> Recipient:
    return Recipient("email", address)


def assert_token_bucket(times: list[float], rate: float, burst: float) -> None:
    """No interval of the send times holds more sends than the bucket allows."""
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - times[i]) + 1e-6, (i, j, times[i], times[j])


# -- throttling ---------------------------------------------------------------------------------
async def test_an_activity_rate_limit_spaces_the_sends_like_a_token_bucket(rig: Rig) -> None:
    addresses = people(35)
    for a in addresses:
        rig.allow(a)

    ack = await rig.deliver([to(a) for a in addresses], header=_with(rate=10))

    assert ack.sent == 35
    times = rig.provider.times()
    assert_token_bucket(times, rate=10, burst=10)
    assert times[-1] == pytest.approx((35 - 10) / 10)  # a full bucket of 10, then 10 per second


async def test_the_activity_bucket_is_shared_by_every_stream_of_the_activity(rig: Rig) -> None:
    addresses = people(20)
    for a in addresses:
        rig.allow(a)

    await rig.deliver([to(a) for a in addresses[:10]], header=_with(rate=5), sequence=1)
    await rig.deliver([to(a) for a in addresses[10:]], header=_with(rate=5), sequence=2)

    assert_token_bucket(rig.provider.times(), rate=5, burst=5)
    assert rig.provider.times()[-1] == pytest.approx((20 - 5) / 5)


async def test_another_activity_has_its_own_bucket(rig: Rig) -> None:
    for a in people(10, "a") + people(10, "b"):
        rig.allow(a)

    await rig.deliver([to(a) for a in people(10, "a")], header=_with(rate=10))
    await rig.deliver([to(a) for a in people(10, "b")], header=_with(rate=10, activity="email2"))

    assert rig.provider.times()[-1] == pytest.approx(0.0)  # each activity spent only its own burst


async def test_the_provider_bucket_limits_every_activity_together(tmp_path: Path) -> None:
    rig, database = await make_rig(tmp_path, provider_rate=4)
    try:
        for a in people(6, "a") + people(6, "b"):
            rig.allow(a)

        await rig.deliver([to(a) for a in people(6, "a")], header=_with(rate=100))
        await rig.deliver([to(a) for a in people(6, "b")], header=_with(rate=100, activity="email2"))

        assert_token_bucket(rig.provider.times(), rate=4, burst=4)
        assert rig.provider.times()[-1] == pytest.approx((12 - 4) / 4)
    finally:
        database.close()


async def test_a_rate_limit_above_the_configured_maximum_is_refused(rig: Rig) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await rig.pipeline.open(SANDBOX, _with(rate=2001))

    assert [v.field for v in caught.value.violations] == ["header.rate_limit_per_second"]


# -- send windows -------------------------------------------------------------------------------
async def test_recipients_outside_the_window_are_deferred_to_its_next_opening_and_sent_then(rig: Rig) -> None:
    rig.clock = rig.pipeline.clock = clock = FakeClock(datetime(2026, 6, 1, 1, 0, tzinfo=UTC))
    rig.provider.clock = clock
    rig.allow("tokyo@example.com", "Asia/Tokyo")  # 10:00 local: open
    rig.allow("stockholm@example.com", "Europe/Stockholm")  # 03:00 local: closed
    header = _with(window=SendWindow(time(9), time(17)))
    batch = [to("tokyo@example.com"), to("stockholm@example.com")]

    first = await rig.deliver(batch, header=header)
    clock.advance(timedelta(hours=6))  # 09:00 in Stockholm
    replay = await rig.deliver(batch, header=header)

    assert (first.sent, first.deferred) == (1, 1)
    assert first.next_window_time == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
    assert (replay.sent, replay.already_sent, replay.deferred) == (1, 1, 0)
    assert Counter(rig.provider.recipients()) == {"tokyo@example.com": 1, "stockholm@example.com": 1}


async def test_a_deferred_recipient_is_in_the_ledger_as_deferred_not_as_sent(rig: Rig) -> None:
    rig.pipeline.clock = FakeClock(datetime(2026, 6, 1, 1, 0, tzinfo=UTC))
    rig.allow("stockholm@example.com", "Europe/Stockholm")

    ack = await rig.deliver([to("stockholm@example.com")], header=_with(window=SendWindow(time(9), time(17))))

    (row,) = rig.ledger.entries(SANDBOX, HEADER.run, HEADER.activity)
    assert (ack.deferred, row.status, row.defer_until) == (1, "deferred", datetime(2026, 6, 1, 7, tzinfo=UTC))
    assert rig.provider.sent == []
    assert rig.gateway.recorded == []


async def test_a_deferred_recipient_releases_its_reservation_and_reserves_again_when_sent(rig: Rig) -> None:
    rig.clock = rig.pipeline.clock = clock = FakeClock(datetime(2026, 6, 1, 1, 0, tzinfo=UTC))
    rig.provider.clock = clock
    rig.allow("stockholm@example.com", "Europe/Stockholm")  # 03:00 local: closed
    header = _with(window=SendWindow(time(9), time(17)))

    await rig.deliver([to("stockholm@example.com")], header=header)
    (row,) = rig.ledger.entries(SANDBOX, HEADER.run, HEADER.activity)
    after_deferral = (list(rig.gateway.released), set(rig.gateway.live))
    clock.advance(timedelta(hours=6))
    ack = await rig.deliver([to("stockholm@example.com")], header=header)

    assert after_deferral == ([row.message_id], set())
    assert ack.sent == 1
    assert rig.gateway.reservations == [[row.message_id], [row.message_id]]
    assert rig.gateway.live == set()  # recorded: the reservation became the communication


# -- retries ------------------------------------------------------------------------------------
async def test_a_provider_failing_30_percent_of_calls_transiently_still_delivers_everything_once(rig: Rig) -> None:
    addresses = people(200)
    for a in addresses:
        rig.allow(a)
    rig.provider.transient_rate = 0.3
    batches = [addresses[i : i + 50] for i in range(0, 200, 50)]

    replays = 0
    while True:  # the scheduler replays unacknowledged work; here every batch is replayed until done
        acks = [await rig.deliver([to(a) for a in batch], sequence=n) for n, batch in enumerate(batches)]
        if not any(ack.failed for ack in acks):
            break
        replays += 1
        assert replays < 10

    assert rig.provider.transient_failures > 0
    assert Counter(rig.provider.recipients()) == Counter(addresses)
    assert {row.status for row in rig.ledger.entries(SANDBOX, HEADER.run, HEADER.activity)} == {"sent"}
    assert len({m.message_id for _, m in rig.provider.sent}) == 200


async def test_backoff_between_attempts_grows_exponentially(rig: Rig) -> None:
    rig.allow("slow@example.com")
    rig.provider.transient_rate = 1.0

    ack = await rig.deliver([to("slow@example.com")])

    assert dict(ack.failed) == {"PROVIDER_TRANSIENT": 1}
    assert rig.provider.attempts["slow@example.com"] == 3
    # Two waits: 0.5 s then 1 s, each plus up to 0.5 s of jitter.
    assert 1.5 <= rig.clock.monotonic() <= 2.5


async def test_a_permanently_failing_address_is_failed_once_with_its_reason(rig: Rig) -> None:
    rig.allow("ok@example.com")
    rig.allow("gone@example.com")
    rig.provider.permanent.add("gone@example.com")
    batch = [to("ok@example.com"), to("gone@example.com")]

    first = await rig.deliver(batch)
    replay = await rig.deliver(batch)

    assert (first.sent, dict(first.failed)) == (1, {"PROVIDER_PERMANENT": 1})
    assert (replay.already_sent, dict(replay.failed)) == (1, {"PROVIDER_PERMANENT": 1})
    assert rig.provider.attempts["gone@example.com"] == 1


async def test_a_transient_failure_is_not_retried_once_its_retry_window_has_passed(rig: Rig) -> None:
    rig.allow("late@example.com")
    rig.provider.transient_rate = 1.0
    await rig.deliver([to("late@example.com")])
    rig.provider.transient_rate = 0.0
    rig.clock.advance(timedelta(hours=85))

    replay = await rig.deliver([to("late@example.com")])

    assert dict(replay.failed) == {"PROVIDER_TRANSIENT": 1}
    assert rig.provider.attempts["late@example.com"] == 3
    assert rig.provider.sent == []


async def test_a_transient_failure_is_retried_by_a_replay_within_its_retry_window(rig: Rig) -> None:
    rig.allow("soon@example.com")
    rig.provider.transient_rate = 1.0
    await rig.deliver([to("soon@example.com")])
    rig.provider.transient_rate = 0.0
    rig.clock.advance(timedelta(hours=83))

    replay = await rig.deliver([to("soon@example.com")])

    assert replay.sent == 1
    assert rig.provider.recipients() == ["soon@example.com"]


def _with(*, rate: int = 0, window: SendWindow | None = None, activity: str = HEADER.activity) -> SendHeader:
    return SendHeader(
        campaign=HEADER.campaign,
        run=HEADER.run,
        activity=activity,
        channel=HEADER.channel,
        category=HEADER.category,
        template=HEADER.template,
        rate_limit_per_second=rate,
        window=window,
    )


@dataclass
class FakeForwarder:
    targets: list[FeedbackTarget] = field(default_factory=list)

    async def forward(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        self.targets.extend(targets)


async def test_a_permanent_refusal_is_forwarded_once_as_a_hard_bounce_for_quarantine(rig: Rig) -> None:
    forwarder = FakeForwarder()
    rig.pipeline.forwarder = forwarder
    rig.allow("ok@example.com")
    rig.allow("gone@example.com")
    rig.provider.permanent.add("gone@example.com")
    batch = [to("ok@example.com"), to("gone@example.com")]

    await rig.deliver(batch)
    await rig.deliver(batch)

    assert [(t.kind, t.address, t.profile_key, t.channel) for t in forwarder.targets] == [
        ("hard_bounce", "gone@example.com", "gone", "email")
    ]


async def test_an_address_refused_in_a_stream_is_skipped_by_a_batch_checked_before_the_refusal(rig: Rig) -> None:
    # A stream checks a batch while the one before is sent (read-ahead): the profile service quarantined
    # the refused address too late for that check, so the session itself must not attempt it again.
    rig.allow("ok@example.com")
    rig.allow("gone@example.com")
    rig.provider.permanent.add("gone@example.com")
    first = [Recipient("email", "gone@example.com", "b1"), Recipient("email", "ok@example.com", "b1")]
    second = [Recipient("email", "gone@example.com", "b2"), Recipient("email", "ok@example.com", "b2")]
    session = await rig.pipeline.open(SANDBOX, HEADER)
    checked_first, checked_second = session.start_check(first), session.start_check(second)

    acks = [
        await session.finish(await session.send(1, first, checked_first)),
        await session.finish(await session.send(2, second, checked_second)),
    ]

    assert [(a.sent, dict(a.failed), dict(a.skipped)) for a in acks] == [
        (1, {"PROVIDER_PERMANENT": 1}, {}),
        (1, {}, {"QUARANTINED": 1}),
    ]
    assert rig.provider.attempts == Counter({"gone@example.com": 1, "ok@example.com": 2})
    entries = {(e.profile_key, e.entity_key): e for e in rig.ledger.entries(SANDBOX, HEADER.run, HEADER.activity)}
    skipped = entries[("gone", "b2")]
    assert (skipped.status, skipped.reason) == ("skipped", "QUARANTINED")
    assert skipped.message_id in rig.gateway.released  # its capping reservation does not keep counting
