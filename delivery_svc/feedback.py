"""Feedback about sent messages: delivered, opened, clicked, bounces, complaints, unsubscribes.

:class:`FeedbackService` validates a batch of events, records them in the send ledger in one
transaction (idempotent on each event id; an unknown message id refuses the whole batch) and then
forwards their consequences through a :class:`FeedbackForwarder`. An event is marked forwarded only
after the forwarder succeeded, so a retry of the same events after an UNAVAILABLE forwards them again.

What is forwarded (:class:`ProfileFeedbackForwarder`): delivered, soft and hard bounces, complaints
and unsubscribes go to the profile service's ``RecordDeliveryEvents`` (quarantine, soft-bounce count,
opt-out), idempotent there on the same event ids. Against a profile service without that RPC, an
unsubscribe or a complaint falls back to ``SetConsent`` (opted out) and bounces are not forwarded.
Opens and clicks have no profile-side effect. Delivered, opened, clicked and bounced (soft or hard)
events are also queued, in the ledger's transaction, as message logs for audience_svc
(:mod:`delivery_svc.message_logs`); complaints and unsubscribes have no message log status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog

from carillon_chassis.database import Database
from carillon_chassis.errors import FieldViolation, InvalidArgument, NotFound
from delivery_svc.eligibility import PROFILE_EVENT_KINDS, DeliveryEventView
from delivery_svc.ledger import FEEDBACK_COLUMNS, FeedbackEvent, FeedbackTarget, Ledger, UnknownMessages
from delivery_svc.throttle import Clock, SystemClock

log = structlog.get_logger("carillon.delivery.feedback")

KINDS = tuple(FEEDBACK_COLUMNS)
OPT_OUT_KINDS = frozenset({"unsubscribe", "complaint"})
MAX_EVENTS = 1000
MAX_EVENT_ID_CHARS = 200
MAX_MESSAGE_ID_CHARS = 64


@dataclass(frozen=True)
class IncomingEvent:
    """An event as the API gives it: the time may be missing."""

    event_id: str
    message_id: str
    kind: str
    event_time: datetime | None = None
    detail: str = ""


class LogWaker(Protocol):
    """Told when message logs were queued (the message log flusher)."""

    def wake(self) -> None:
        """Flush soon."""
        ...


class ProfileConsent(Protocol):
    """The profile service operations feedback needs."""

    async def record_delivery_events(self, sandbox: str, events: Sequence[DeliveryEventView]) -> bool:
        """Forward delivery events; False when the profile service cannot take them."""
        ...

    async def opt_out(self, sandbox: str, profile_id: str, channel: str, source: str) -> None:
        """Opt the profile out of a channel."""
        ...


class FeedbackForwarder(Protocol):
    """Where the consequences of feedback go after the ledger."""

    async def forward(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        """Forward the events (idempotent: an event may be forwarded more than once)."""
        ...


class ProfileFeedbackForwarder:
    """Forwards unsubscribes and complaints to the profile service as channel opt-outs."""

    def __init__(self, profiles: ProfileConsent) -> None:
        self.profiles = profiles

    async def forward(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        """Forward the events the profile service acts on, in one call."""
        events = [
            DeliveryEventView(
                event_id=t.event_id,
                kind=t.kind,
                channel=t.channel,
                address=t.address,
                profile_id="" if ":" in t.profile_key else t.profile_key,
                event_time=t.event_time,
            )
            for t in targets
            if t.kind in PROFILE_EVENT_KINDS
        ]
        if not events or await self.profiles.record_delivery_events(sandbox, events):
            return
        await self._opt_out_only(sandbox, targets)

    async def _opt_out_only(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        """The fallback: one opt-out per profile and channel among the unsubscribes and complaints."""
        done: set[tuple[str, str]] = set()
        not_forwarded = 0
        for target in targets:
            if target.kind not in OPT_OUT_KINDS:
                not_forwarded += 1
                continue
            key = (target.profile_key, target.channel)
            if key in done:
                continue
            done.add(key)
            await self.profiles.opt_out(sandbox, target.profile_key, target.channel, f"feedback:{target.kind}")
        if not_forwarded:
            log.info("feedback recorded in the ledger only (no profile or audience RPC yet)", events=not_forwarded)


@dataclass(frozen=True)
class FeedbackResult:
    """Events newly recorded and repeats ignored."""

    recorded: int
    duplicates: int


class FeedbackService:
    """Records feedback in the ledger and forwards it."""

    def __init__(
        self,
        database: Database,
        ledger: Ledger,
        forwarder: FeedbackForwarder,
        clock: Clock | None = None,
        log_waker: LogWaker | None = None,
    ) -> None:
        self.database = database
        self.ledger = ledger
        self.forwarder = forwarder
        self.clock: Clock = clock or SystemClock()
        self.log_waker = log_waker

    def _check(self, events: Sequence[IncomingEvent]) -> None:
        if len(events) > MAX_EVENTS:
            raise InvalidArgument(f"at most {MAX_EVENTS} events per call", field="events", reason="TOO_MANY_EVENTS")
        violations: list[FieldViolation] = []
        for i, event in enumerate(events):
            where = f"events[{i}]"
            if not event.event_id or len(event.event_id) > MAX_EVENT_ID_CHARS:
                violations.append(FieldViolation(f"{where}.event_id", f"1 to {MAX_EVENT_ID_CHARS} characters"))
            if not event.message_id or len(event.message_id) > MAX_MESSAGE_ID_CHARS:
                violations.append(FieldViolation(f"{where}.message_id", f"1 to {MAX_MESSAGE_ID_CHARS} characters"))
            if event.kind not in KINDS:
                violations.append(FieldViolation(f"{where}.kind", "kind must be set"))
            for name in ("event_id", "message_id", "detail"):  # no database text column can hold NUL
                if "\x00" in getattr(event, name):
                    violations.append(FieldViolation(f"{where}.{name}", "cannot contain NUL characters"))
            if len(violations) >= 100:
                break
        if violations:
            raise InvalidArgument("invalid feedback events", violations=violations, reason="INVALID_FEEDBACK")

    async def record(self, sandbox: str, events: Sequence[IncomingEvent]) -> FeedbackResult:
        """Record ``events`` and forward them; NOT_FOUND (nothing written) for an unknown message id."""
        self._check(events)
        if not events:
            return FeedbackResult(0, 0)
        now = self.clock.now()
        domain = [FeedbackEvent(e.event_id, e.message_id, e.kind, e.event_time or now, e.detail) for e in events]
        try:
            outcome = await self.database.run(self.ledger.record_feedback, sandbox, domain)
        except UnknownMessages as exc:
            raise NotFound(
                "feedback about messages that are not in the ledger",
                violations=[FieldViolation(f"events[{i}].message_id", "no such message") for i in exc.positions[:100]],
                reason="MESSAGE_NOT_FOUND",
            ) from exc
        if outcome.recorded and self.log_waker is not None:
            self.log_waker.wake()
        if outcome.to_forward:
            await self.forwarder.forward(sandbox, outcome.to_forward)
            await self.database.run(self.ledger.mark_forwarded, sandbox, [t.event_id for t in outcome.to_forward])
        return FeedbackResult(outcome.recorded, outcome.duplicates)
