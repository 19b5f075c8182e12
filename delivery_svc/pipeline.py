"""The send pipeline: what a delivery worker does with each batch of a Send stream.

Per batch: validate the recipients → one eligibility call for the whole batch (for marketing, it also
reserves the capping places, see below) → one ledger lookup of the batch's keys → classify each
recipient (already sent, recorded skip or failure, newly ineligible, to render) → render in the
sandbox → write ``pending`` (and ``skipped``) ledger rows in one transaction → send through the
provider → mark ``sent`` / ``failed`` (and queue their message logs for audience_svc) in one
transaction (with a provider that honours no idempotency key, SMTP, each message is marked ``sent``
in its own transaction as soon as the provider accepted it, so that a crash repeats at most the one
message in flight) → release the reservations of messages not sent → record the communications in
one call (which confirms the reservations) → return the acknowledgement. A Send stream overlaps its
batches: the next batch's eligibility call starts as soon as it arrives, and a batch's last two steps
run while the next batch is sent (``SendSession.start_check`` / ``send`` / ``finish``). The
acknowledgement exists only once the ledger is durable, so a crash at any point is repaired by
replaying the batch:

- a ``sent`` row is counted ``already_sent`` and not sent again;
- a ``skipped`` or ``failed`` row reports its recorded reason again;
- a ``pending`` row (a crash between the ledger write and the send) is sent again with the same
  message id, the provider idempotency key, if the recipient is still eligible;
- a row ``failed`` transiently is retried while its retry window (from its first write) lasts; past
  the window a pending row fails with ``RETRY_WINDOW_EXPIRED``;
- a ``deferred`` row (outside the header's send window in the recipient's local time) is sent once
  the window is open, and deferred again until then.

Capping is reserved in the eligibility call itself. For a marketing batch, the one call checks every
recipient and, atomically in profile_stub (per-profile row locks), reserves one send for each allowed
one under its message id, which profile_stub derives from the profile it resolved exactly as the
ledger does (:func:`carillon_chassis.messages.message_id`: run, activity, profile, entity key), and
returns with the verdict; the pipeline checks that the ids agree. A message reserved or recorded
before (a replay, a crashed attempt) counts once. A recipient whose cap another campaign took is
skipped ``CAPPED``. The reservation of a message the batch does not send is released: one the ledger
shows sent is the message's communication already, but a recorded skip or final failure, an expired
retry window, a deferral (reserved again when the window opens), a render failure, a provider
failure, and the reservation a crashed attempt may have left to a pending message that is now
skipped, are freed; a send that the provider did not get to (unavailable) keeps its reservation for
the replay (it expires on its own otherwise). An allowed marketing verdict without a reservation (a
profile service that ignored the request) fails the batch rather than send uncounted.

Sends go through a token bucket of the channel activity (the header's rate limit) and one of the
provider (the worker's setting); time comes from an injectable clock.

Plain domain code: the gateway, the provider, the ledger and the templates are given, so the pipeline
runs with fakes in tests. Database work runs on the database worker pool and rendering and sending on
worker threads; nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

import structlog

from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import CarillonError, FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from carillon_chassis.messages import message_id, profile_key
from carillon_chassis.names import parse_name, validate_id
from delivery_svc.direct_mail import OutgoingRow, stream_name
from delivery_svc.eligibility import Communication, EligibilityGateway, ProfileView, Verdict
from delivery_svc.emails import InvalidAddress, OutgoingEmail, compose_email
from delivery_svc.ledger import (
    DEFERRED,
    FAILED,
    PENDING,
    SENT,
    SKIPPED,
    FeedbackTarget,
    Ledger,
    LedgerEntry,
    LedgerKey,
    LogEvent,
    LoggedMessage,
    LogGroup,
    StatusChange,
    logged_column,
)
from delivery_svc.providers import (
    PROVIDER_PERMANENT,
    PROVIDER_TRANSIENT,
    DeliveryReport,
    MessageProvider,
    OutgoingMessage,
    RetryPolicy,
    deliver_batch,
)
from delivery_svc.push import OutgoingPush
from delivery_svc.sms import MAX_SEGMENTS, OutgoingSms, count_segments
from delivery_svc.templates import (
    CHANNELS,
    PUSH_DATA_PREFIX,
    CompiledTemplate,
    RenderError,
    TemplateStore,
    compile_template,
)
from delivery_svc.throttle import ActivityBuckets, Clock, SystemClock, TokenBucket
from delivery_svc.windows import SendWindow

log = structlog.get_logger("carillon.delivery")

# Reasons a recipient is skipped.
NO_CONSENT = "NO_CONSENT"
QUARANTINED = "QUARANTINED"
CAPPED = "CAPPED"
MISSING_ADDRESS = "MISSING_ADDRESS"
UNKNOWN_PROFILE = "UNKNOWN_PROFILE"
INELIGIBLE = "INELIGIBLE"  # a verdict this worker does not know
RENDER_ERROR = "RENDER_ERROR"
INVALID_ADDRESS = "INVALID_ADDRESS"
DUPLICATE = "DUPLICATE"  # the same profile and entity key earlier in the same batch
MESSAGE_TOO_LONG = "MESSAGE_TOO_LONG"
_PHONE = re.compile(r"^\+?[0-9]{6,16}$")
RETRY_WINDOW_EXPIRED = "RETRY_WINDOW_EXPIRED"
# Failure reasons a replay retries while the retry window lasts.
RETRYABLE_REASONS = frozenset({PROVIDER_TRANSIENT})
DEFAULT_MAX_RATE = 2000
SKIP_REASONS = {
    "no_consent": NO_CONSENT,
    "quarantined": QUARANTINED,
    "capped": CAPPED,
    "missing_address": MISSING_ADDRESS,
    "unknown_profile": UNKNOWN_PROFILE,
}
CATEGORIES = ("marketing", "transactional")
MAX_NAMESPACE_CHARS = 63
MAX_IDENTITY_CHARS = 320
MAX_ENTITY_KEY_CHARS = 255
_MAX_VIOLATIONS = 100


@dataclass(frozen=True)
class SendHeader:
    """What a Send stream delivers: names as in the API, channel and category as domain names."""

    campaign: str
    run: str
    activity: str
    channel: str
    category: str
    template: str
    rate_limit_per_second: int = 0
    window: SendWindow | None = None


@dataclass(slots=True)  # not frozen: one per recipient, and a frozen dataclass is four times slower to build
class Recipient:
    """One recipient: an identity, the working-set record's key and row."""

    namespace: str
    value: str
    entity_key: str = ""
    target: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class BatchAck:
    """The acknowledgement of one batch."""

    sequence: int
    sent: int = 0
    already_sent: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    deferred: int = 0
    next_window_time: datetime | None = None


def profile_context(profile: ProfileView, address: str) -> dict[str, Any]:
    """The ``profile`` variable of a template."""
    email = phone = ""
    for namespace, value in reversed(profile.identities):  # the first identity of a namespace wins
        if namespace == "email":
            email = value
        elif namespace == "phone":
            phone = value
    return {
        "id": profile.profile_id,
        "name": f"profiles/{profile.profile_id}",
        "first_name": profile.first_name,
        "last_name": profile.last_name,
        "locale": profile.locale,
        "time_zone": profile.time_zone,
        "email": email or (address if "@" in address else ""),
        "phone": phone,
        "address": address,
        "attributes": dict(profile.attributes),
    }


@dataclass
class SentBatch:
    """A batch between :meth:`SendSession.send` and :meth:`SendSession.finish`."""

    ack: BatchAck
    recipients: int
    timings: dict[str, float]
    to_release: list[str] = field(default_factory=list)  # reservations of messages not sent
    to_record: list[tuple[str, str]] = field(default_factory=list)  # (message id, profile id) sent
    unsent: int = 0  # messages the provider did not take: it went away (finish raises UNAVAILABLE)
    error: str = ""  # why


@dataclass
class Prepared:
    """A batch between :meth:`SendSession.prepare` and :meth:`SendSession.transmit`: its ledger rows
    written, its messages rendered."""

    ack: BatchAck
    recipients: int
    timings: dict[str, float]
    keys: frozenset[LedgerKey] = frozenset()
    jobs: list[_Job] = field(default_factory=list)
    emails: list[OutgoingMessage] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)  # profile id by message id
    reserved: set[str] = field(default_factory=set)  # messages whose reservation this batch holds
    logs_queued: bool = False  # message logs queued with the ledger write
    to_release: list[str] = field(default_factory=list)
    to_record: list[tuple[str, str]] = field(default_factory=list)
    first_attempts: frozenset[str] = frozenset()  # messages whose ledger rows this batch wrote
    others_since: datetime | None = None  # none of the other messages can have been sent before then


@dataclass
class _Job:
    """A recipient to render and send."""

    message_id: str
    key: LedgerKey
    recipient: Recipient
    verdict: Verdict
    existing: LedgerEntry | None
    index: int  # in its batch


@dataclass(frozen=True)
class Checked:
    """A batch's eligibility call and the rendering of the messages it allows, under way."""

    verdicts: asyncio.Future[list[Verdict]]
    rendered: asyncio.Future[dict[int, OutgoingMessage | str]]


class LogWaker(Protocol):
    """Told when message logs were queued (the message log flusher)."""

    def wake(self) -> None:
        """Flush soon."""
        ...


class QuarantineForwarder(Protocol):
    """Where permanent refusals go (the feedback forwarder: the profile service's quarantine)."""

    async def forward(self, sandbox: str, targets: Sequence[FeedbackTarget]) -> None:
        """Forward hard-bounce events."""
        ...


class DeliveryPipeline:
    """Eligibility, rendering, ledger and provider of one channel worker."""

    def __init__(
        self,
        *,
        database: Database,
        templates: TemplateStore,
        ledger: Ledger,
        gateway: EligibilityGateway,
        provider: MessageProvider[Any],
        channel: str,
        max_batch: int,
        sender_name: str,
        sender_address: str,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        max_rate: int = DEFAULT_MAX_RATE,
        provider_rate: float = 0,
        forwarder: QuarantineForwarder | None = None,
        log_waker: LogWaker | None = None,
    ) -> None:
        self.database = database
        self.templates = templates
        self.ledger = ledger
        self.gateway = gateway
        self.provider = provider
        self.channel = channel
        self.max_batch = max_batch
        self.sender_name = sender_name
        self.sender_address = sender_address
        self.retry = retry or RetryPolicy()
        self.clock: Clock = clock or SystemClock()
        self.max_rate = max_rate
        self.forwarder = forwarder
        self.log_waker = log_waker
        self.activity_buckets = ActivityBuckets(self.clock)
        self.provider_bucket = TokenBucket(provider_rate, self.clock) if provider_rate > 0 else None

    async def open(self, sandbox: str, header: SendHeader) -> SendSession:
        """Check a stream's header and load its template; the session then takes the batches."""
        self._check_header(header)
        (template_id,) = parse_name(header.template, "templates", field="header.template")
        template = await self.database.run(self.templates.get, sandbox, template_id, field_name="header.template")
        if template.channel != header.channel:
            raise FailedPrecondition(
                f"template {header.template!r} is for channel {template.channel!r}, not {header.channel!r}",
                field="header.template",
                reason="TEMPLATE_CHANNEL_MISMATCH",
            )
        try:
            compiled = compile_template(template)
        except InvalidArgument as exc:
            raise FailedPrecondition(
                f"template {header.template!r} no longer compiles", field="header.template", reason="TEMPLATE_INVALID"
            ) from exc
        structlog.contextvars.bind_contextvars(campaign=header.campaign, run=header.run, activity=header.activity)
        return SendSession(self, sandbox, header, compiled)

    async def preview(
        self,
        sandbox: str,
        template_name: str,
        profile: ProfileView,
        target: Mapping[str, Any],
    ) -> tuple[str, dict[str, str]]:
        """The template's content kind and every part rendered for ``profile`` and ``target``
        (INVALID_ARGUMENT when it does not render)."""
        (template_id,) = parse_name(template_name, "templates", field="template")
        template = await self.database.run(self.templates.get, sandbox, template_id, field_name="template")
        compiled = compile_template(template)
        address = profile.identity("phone" if template.channel == "sms" else "email")
        context = {"profile": profile_context(profile, address), "target": dict(target)}
        try:
            return template.content_kind, compiled.render(context)
        except RenderError as exc:
            raise InvalidArgument(
                f"the template does not render: {exc}", field="target", reason="RENDER_ERROR"
            ) from exc

    def _check_header(self, header: SendHeader) -> None:
        if header.channel not in CHANNELS:
            raise InvalidArgument("channel must be set", field="header.channel", reason="INVALID_HEADER")
        if header.channel != self.channel:
            raise InvalidArgument(
                f"this worker serves channel {self.channel!r}, not {header.channel!r}",
                field="header.channel",
                reason="CHANNEL_NOT_SERVED",
            )
        violations: list[FieldViolation] = []
        if header.category not in CATEGORIES:
            violations.append(FieldViolation("header.category", "category must be set"))
        ids: dict[str, list[str]] = {}
        for name, collections in (("campaign", ("campaigns",)), ("run", ("campaigns", "runs"))):
            try:
                ids[name] = parse_name(getattr(header, name), *collections, field=f"header.{name}")
            except InvalidArgument as exc:
                violations += exc.violations
        if "campaign" in ids and "run" in ids and ids["campaign"][0] != ids["run"][0]:
            violations.append(FieldViolation("header.run", "the run belongs to another campaign"))
        try:
            validate_id(header.activity, "header.activity")
        except InvalidArgument as exc:
            violations += exc.violations
        if not 0 <= header.rate_limit_per_second <= self.max_rate:
            violations.append(
                FieldViolation("header.rate_limit_per_second", f"must be between 1 and {self.max_rate}, or 0 for none")
            )
        if violations:
            raise InvalidArgument("invalid send header", violations=violations, reason="INVALID_HEADER")


class SendSession:
    """One Send stream after its header: delivers batches one at a time."""

    def __init__(
        self, pipeline: DeliveryPipeline, sandbox: str, header: SendHeader, template: CompiledTemplate
    ) -> None:
        self.pipeline = pipeline
        self.sandbox = sandbox
        self.header = header
        self.template = template
        self.bucket = pipeline.activity_buckets.get(
            (sandbox, header.run, header.activity), header.rate_limit_per_second
        )
        # Direct mail: the extract files of this run and activity continue across batches.
        self.extract_stream = stream_name(sandbox, header.run, header.activity)
        # The ledger keys of the batch being transmitted, and its transmission.
        self._in_flight: tuple[frozenset[LedgerKey], asyncio.Future[SentBatch]] | None = None
        # Addresses the provider refused permanently during this stream: quarantined by the profile
        # service, but a batch checked ahead of the refusal still holds them as allowed (a profile with a
        # record in two batches of a multi-entity send). Such messages are skipped, never attempted.
        self._refused: set[str] = set()

    async def close(self) -> None:
        """The stream ended cleanly: complete what the provider keeps open for it (the last extract
        file of a direct-mail activity). Best effort: a failure is logged, and the open file is
        completed by the next stream of the activity or when it fills up."""
        end_stream = getattr(self.pipeline.provider, "end_stream", None)
        if end_stream is None:
            return
        try:
            await asyncio.to_thread(end_stream, self.extract_stream)
        except OSError as exc:
            log.error("the last extract file could not be completed", stream=self.extract_stream, error=str(exc))

    # -- validation -----------------------------------------------------------------------------
    def _check_batch(self, recipients: Sequence[Recipient]) -> None:
        if len(recipients) > self.pipeline.max_batch:
            raise InvalidArgument(
                f"at most {self.pipeline.max_batch} recipients per batch",
                field="batch.recipients",
                reason="BATCH_TOO_LARGE",
            )
        violations: list[FieldViolation] = []
        for i, r in enumerate(recipients):
            where = f"batch.recipients[{i}]"
            if not r.namespace or not r.value:
                violations.append(FieldViolation(f"{where}.identity", "an identity needs a namespace and a value"))
            elif len(r.namespace) > MAX_NAMESPACE_CHARS or len(r.value) > MAX_IDENTITY_CHARS:
                violations.append(FieldViolation(f"{where}.identity", "the identity is too long"))
            elif "\x00" in r.namespace or "\x00" in r.value:  # no database text column can hold it
                violations.append(FieldViolation(f"{where}.identity", "the identity contains a NUL character"))
            if len(r.entity_key) > MAX_ENTITY_KEY_CHARS:
                violations.append(FieldViolation(f"{where}.entity_key", f"at most {MAX_ENTITY_KEY_CHARS} characters"))
            elif "\x00" in r.entity_key:
                violations.append(FieldViolation(f"{where}.entity_key", "the entity key contains a NUL character"))
            if len(violations) >= _MAX_VIOLATIONS:
                break
        if violations:
            raise InvalidArgument("invalid recipients", violations=violations, reason="INVALID_BATCH")

    # -- the batch ------------------------------------------------------------------------------
    async def deliver(self, sequence: int, recipients: Sequence[Recipient]) -> BatchAck:
        """Deliver one batch and return its acknowledgement once its ledger rows are durable and its
        communications recorded: :meth:`start_check`, :meth:`send`, then :meth:`finish`."""
        checked = self.start_check(recipients)
        return await self.finish(await self.send(sequence, recipients, checked))

    def start_check(self, recipients: Sequence[Recipient]) -> Checked:
        """Validate a batch (INVALID_ARGUMENT naming the bad recipients) and start its eligibility call
        (for marketing, the check that also reserves each allowed recipient's place under the caps),
        then the rendering of the messages of the recipients it allows.

        A Send stream starts it as soon as the batch arrives, while the batch before it is still being
        sent: the ledger lookup, which decides what is sent again, happens in :meth:`send`, after the
        batches before; a reservation that the ledger then makes useless is released, and a message
        rendered ahead that is not sent is dropped."""
        self._check_batch(recipients)
        loop = asyncio.get_running_loop()
        if not recipients:
            verdicts: asyncio.Future[list[Verdict]] = loop.create_future()
            verdicts.set_result([])
            rendered: asyncio.Future[dict[int, OutgoingMessage | str]] = loop.create_future()
            rendered.set_result({})
            return Checked(verdicts, rendered)
        header, gateway = self.header, self.pipeline.gateway
        identities = [(r.namespace, r.value) for r in recipients]
        if header.category == "marketing":
            verdicts = asyncio.ensure_future(
                gateway.check_and_reserve(
                    self.sandbox,
                    header.channel,
                    identities,
                    header.run,
                    header.activity,
                    [r.entity_key for r in recipients],
                )
            )
        else:
            verdicts = asyncio.ensure_future(gateway.check(self.sandbox, header.channel, header.category, identities))
        return Checked(verdicts, asyncio.ensure_future(self._render_ahead(recipients, verdicts)))

    async def _render_ahead(
        self, recipients: Sequence[Recipient], verdicts: asyncio.Future[list[Verdict]]
    ) -> dict[int, OutgoingMessage | str]:
        """The messages of the allowed recipients by their index in the batch, rendered as soon as the
        eligibility answer is in (nothing when it failed: :meth:`send` reports that)."""
        try:
            answered = await asyncio.shield(verdicts)
        except Exception:
            return {}
        if len(answered) != len(recipients):
            return {}
        return await asyncio.to_thread(self._render_allowed, recipients, answered)

    def _render_allowed(self, recipients: Sequence[Recipient], verdicts: Sequence[Verdict]) -> dict[int, Any]:
        sandbox, header, render = self.sandbox, self.header, self._render
        rendered: dict[int, OutgoingMessage | str] = {}
        for index, (recipient, verdict) in enumerate(zip(recipients, verdicts, strict=True)):
            if verdict.verdict != "allowed" or not verdict.address:
                continue
            mid = verdict.message_id
            if not mid:  # not reserved: the ledger's message id of the recipient's key
                profile = verdict.profile
                key = profile_key(profile.profile_id if profile else None, recipient.namespace, recipient.value)
                mid = message_id(sandbox, header.run, header.activity, key, recipient.entity_key)
            rendered[index] = render(mid, recipient, verdict)
        return rendered

    async def abandon(self, checked: Checked) -> None:
        """A batch whose check started will not be sent (its stream ended first): release what its check
        reserved (best effort; a reservation left behind expires on its own).

        A check still under way is waited for (within its call's deadline), not cancelled: profile_stub
        may have committed its reservations before a cancellation reached it, and they would then count
        against the profiles' caps until they expired."""
        checked.rendered.cancel()
        try:
            verdicts = await asyncio.shield(checked.verdicts)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not checked.verdicts.cancelled() or (task is not None and task.cancelling()):
                raise  # this task was cancelled (not only the check)
            return
        except Exception:  # the check failed: what it may have reserved before failing expires on its own
            return
        await self._release([v.message_id for v in verdicts if v.reserved and v.message_id])

    async def release_prepared(self, prepared: Prepared) -> None:
        """A prepared batch will not be transmitted (its stream ended first): release every reservation
        it holds. Its ``pending`` rows are sent by the replay, whose check reserves them again."""
        await self._release([*prepared.to_release, *prepared.reserved])

    async def send(self, sequence: int, recipients: Sequence[Recipient], checked: Checked) -> SentBatch:
        """Send one batch whose check :meth:`start_check` started: :meth:`prepare` then :meth:`transmit`.
        What is left for :meth:`finish` (releasing reservations, recording the communications) may
        overlap the next batch's send."""
        return await self.start_transmit(await self.prepare(sequence, recipients, checked))

    async def prepare(self, sequence: int, recipients: Sequence[Recipient], checked: Checked) -> Prepared:
        """The first half of a batch's send: ledger lookup, rendering (of what was not rendered ahead)
        and the ledger write of its ``pending`` and ``skipped`` rows.

        A Send stream prepares a batch while the batch before it is transmitted: a batch that shares a
        ledger key with the one in flight waits for its transmission first, so that the lookup sees
        that message's final status (a message is never sent twice because its first row was still
        ``pending``)."""
        ack = BatchAck(sequence)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        verdicts = await checked.verdicts
        if not recipients:
            return Prepared(ack, 0, timings)
        pipeline, header, sandbox = self.pipeline, self.header, self.sandbox
        if len(verdicts) != len(recipients):
            raise Unavailable(
                f"the profile service answered {len(verdicts)} verdicts for {len(recipients)} identities",
                reason="PROFILE_BAD_RESPONSE",
            )
        keys = [
            (profile_key(v.profile.profile_id if v.profile else None, r.namespace, r.value), r.entity_key)
            for r, v in zip(recipients, verdicts, strict=True)
        ]
        timings["eligibility"] = time.perf_counter() - started
        started = time.perf_counter()
        batch_keys = frozenset(keys)
        in_flight = self._in_flight
        if in_flight is not None and not in_flight[1].done() and not batch_keys.isdisjoint(in_flight[0]):
            await asyncio.wait({in_flight[1]})
        existing = await pipeline.database.run(pipeline.ledger.find, sandbox, header.run, header.activity, keys)

        new_rows: list[LedgerEntry] = []
        changes: list[StatusChange] = []
        jobs: list[_Job] = []
        to_record: list[tuple[str, str]] = []  # (message id, profile id)
        seen: set[LedgerKey] = set()
        now = pipeline.clock.now()
        window_s = pipeline.retry.window

        logs: list[LogEvent] = []  # message logs queued with the ledger write (failures found here)
        to_release: list[str] = []  # reservations of messages that will not be sent

        def may_hold_reservation(row: LedgerEntry | None) -> bool:
            """A pending row is a message attempted before, whose capping reservation may still be live
            (the attempt reserved, wrote the row and never got to send)."""
            return row is not None and row.status == PENDING and header.category == "marketing"

        def skip(
            mid: str, key: LedgerKey, reason: str, row: LedgerEntry | None, recipient: Recipient, holds: bool = False
        ) -> None:
            ack.skipped[reason] += 1
            if holds or may_hold_reservation(row):
                to_release.append(mid)  # it will not be sent: its reservation must not keep counting
            if row is None:
                new_rows.append(self._entry(mid, key, SKIPPED, reason, recipient))
            else:
                changes.append(StatusChange(mid, SKIPPED, reason))

        def defer(
            mid: str, key: LedgerKey, until: datetime, row: LedgerEntry | None, recipient: Recipient, holds: bool
        ) -> None:
            ack.deferred += 1
            if holds:
                to_release.append(mid)  # reserved again when the window opens and it is sent
            if ack.next_window_time is None or until < ack.next_window_time:
                ack.next_window_time = until
            if row is None:
                new_rows.append(self._entry(mid, key, DEFERRED, "", recipient, defer_until=until))
            else:
                changes.append(StatusChange(mid, DEFERRED, "", defer_until=until))

        def expired(row: LedgerEntry) -> bool:
            return row.create_time is not None and now - row.create_time > window_s

        reserved: set[str] = set()
        for index, (recipient, verdict, key) in enumerate(zip(recipients, verdicts, keys, strict=True)):
            if key in seen:  # the same message as an earlier recipient: that one decides
                ack.skipped[DUPLICATE] += 1
                continue
            seen.add(key)
            row = existing.get(key)
            mid = row.message_id if row is not None else message_id(sandbox, header.run, header.activity, *key)
            # The marketing check reserved each allowed recipient's place under the caps, under the
            # message id it derived the same way (a message reserved or recorded before counts once).
            holds = verdict.reserved
            if header.category == "marketing" and verdict.verdict == "allowed" and not holds:
                raise Unavailable(  # a profile service that ignored the reservation (an older version)
                    "the profile service allowed a marketing message without reserving it",
                    reason="PROFILE_BAD_RESPONSE",
                )
            if holds and verdict.message_id != mid:
                raise Unavailable(
                    f"the profile service reserved message {verdict.message_id!r} for ledger message {mid!r}",
                    reason="PROFILE_BAD_RESPONSE",
                )
            if row is not None and row.status == SENT:
                ack.already_sent += 1  # its reservation is (or becomes, recorded again) its communication
                if verdict.profile is not None:
                    to_record.append((row.message_id, verdict.profile.profile_id))
                continue
            if row is not None and row.status == SKIPPED:
                ack.skipped[row.reason] += 1
                if holds:
                    to_release.append(mid)
                continue
            if row is not None and row.status == FAILED and (row.reason not in RETRYABLE_REASONS or expired(row)):
                ack.failed[row.reason] += 1
                if holds:
                    to_release.append(mid)
                continue
            if row is not None and row.status == PENDING and expired(row):
                ack.failed[RETRY_WINDOW_EXPIRED] += 1
                changes.append(StatusChange(row.message_id, FAILED, RETRY_WINDOW_EXPIRED))
                logs.append(LogEvent(sandbox, row.message_id, "failed", now, LoggedMessage.of(row)))
                if holds or may_hold_reservation(row):
                    to_release.append(row.message_id)
                continue
            if verdict.verdict != "allowed":
                skip(mid, key, SKIP_REASONS.get(verdict.verdict, INELIGIBLE), row, recipient, holds)
            elif not verdict.address:
                skip(mid, key, MISSING_ADDRESS, row, recipient, holds)
            else:
                opening = None
                if header.window is not None:
                    zone = verdict.profile.time_zone if verdict.profile is not None else ""
                    opening = header.window.next_opening(now, zone)
                if opening is not None:
                    defer(mid, key, opening, row, recipient, holds)
                else:
                    if holds:
                        reserved.add(mid)
                    jobs.append(_Job(mid, key, recipient, verdict, row, index))

        timings["ledger_find"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            ahead = await checked.rendered
        except Exception:  # rendering ahead is an optimisation only: render here instead
            ahead = {}
        rendered = await asyncio.to_thread(self._render_all, jobs, ahead)
        emails: list[OutgoingMessage] = []
        profiles: dict[str, str] = {}
        # No message of the batch can have been sent before its ledger row was first written: the
        # earliest such time (rows written below: now), for a provider that looks earlier sends up.
        others_since = utcnow()
        for job, result in zip(jobs, rendered, strict=True):
            if isinstance(result, str):
                skip(job.message_id, job.key, result, job.existing, job.recipient)
                if job.message_id in reserved:
                    to_release.append(job.message_id)
                continue
            emails.append(result)
            if job.verdict.profile is not None:
                profiles[job.message_id] = job.verdict.profile.profile_id
            if job.existing is None:
                new_rows.append(self._entry(job.message_id, job.key, PENDING, "", job.recipient, result.recipient))
                continue
            created = as_utc(job.existing.create_time)
            if created is not None and created < others_since:
                others_since = created
            if job.existing.status != PENDING or job.existing.address != result.recipient:
                changes.append(StatusChange(job.message_id, PENDING, "", result.recipient))

        timings["render"] = time.perf_counter() - started
        started = time.perf_counter()
        all_new = True
        if new_rows or changes:
            all_new = await pipeline.database.run(pipeline.ledger.write, new_rows, changes, logs)
        # Messages whose ledger rows this batch wrote, durably: no earlier attempt can have sent them (when
        # another writer took one of the keys meanwhile, none is told, as which ones is not known; nor
        # when the ledger's commits are not durable).
        first_attempts = frozenset(e.message_id for e in new_rows if e.status == PENDING) if all_new else frozenset()
        timings["ledger_write"] = time.perf_counter() - started
        return Prepared(
            ack,
            len(recipients),
            timings,
            keys=batch_keys,
            jobs=jobs,
            emails=emails,
            profiles=profiles,
            reserved=reserved,
            logs_queued=bool(logs),
            to_release=to_release,
            to_record=to_record,
            first_attempts=first_attempts,
            others_since=others_since,
        )

    def start_transmit(self, prepared: Prepared) -> asyncio.Future[SentBatch]:
        """Start :meth:`transmit` of a prepared batch; the next batch's :meth:`prepare` knows it is in
        flight."""
        task = asyncio.ensure_future(self.transmit(prepared))
        self._in_flight = (prepared.keys, task)
        return task

    async def transmit(self, prepared: Prepared) -> SentBatch:
        """The second half of a batch's send: the provider, then the ``sent``/``failed`` marks (and the
        quarantine of permanent refusals)."""
        pipeline, ack, timings, jobs = self.pipeline, prepared.ack, prepared.timings, prepared.jobs
        to_record, to_release, profiles = prepared.to_record, prepared.to_release, prepared.profiles
        if not prepared.recipients:
            return SentBatch(ack, 0, timings)
        started = time.perf_counter()
        report = None
        marked: set[str] = set()  # marked sent as the provider accepted them (providers with mark_each_send)
        by_id = {job.message_id: job for job in jobs}
        emails, quarantined = prepared.emails, []
        if self._refused:  # refused by the provider earlier in this stream, after this batch's check
            refused = self._refused
            quarantined = [e.message_id for e in emails if by_id[e.message_id].verdict.address in refused]
            if quarantined:
                skipped = set(quarantined)
                emails = [e for e in emails if e.message_id not in skipped]
        if emails:
            report = await asyncio.to_thread(
                deliver_batch,
                pipeline.provider,
                emails,
                pipeline.retry,
                throttles=(self.bucket, pipeline.provider_bucket),
                clock=pipeline.clock,
                on_sent=self._mark_one(marked, by_id) if getattr(pipeline.provider, "mark_each_send", False) else None,
                first_attempts=prepared.first_attempts,
                others_since=prepared.others_since,
            )
        timings["send"] = time.perf_counter() - started
        started = time.perf_counter()
        if quarantined:
            report = report or DeliveryReport()
            to_release += [mid for mid in quarantined if mid in prepared.reserved]
        if report is not None:
            await self._mark(report, ack, by_id, marked, quarantined)
            self._refused.update(
                by_id[mid].verdict.address
                for mid, reason in report.failed.items()
                if reason == PROVIDER_PERMANENT and mid in by_id
            )
            await self._quarantine(report, by_id)
            to_record += [(mid, profiles[mid]) for mid in report.sent if mid in profiles]
            to_release += [mid for mid in report.failed if mid in prepared.reserved]
        queued = prepared.logs_queued or (report is not None and (report.sent or report.failed))
        if pipeline.log_waker is not None and queued:
            pipeline.log_waker.wake()
        timings["mark"] = time.perf_counter() - started
        unsent, error = (len(report.unsent), report.error) if report is not None else (0, "")
        return SentBatch(ack, prepared.recipients, timings, to_release, to_record, unsent, error)

    async def finish(self, batch: SentBatch) -> BatchAck:
        """Complete a sent batch: release the reservations of its messages not sent, record the
        communications of those sent (which confirms their reservations), and return the
        acknowledgement; UNAVAILABLE when the provider went away during the send (the stream then
        replays the batch)."""
        ack, timings, header = batch.ack, batch.timings, self.header
        started = time.perf_counter()
        await self._release(batch.to_release)
        # Recorded even when the batch fails below: the messages sent before the provider went away
        # confirm their reservations now, not only if and when the stream replays the batch.
        if batch.to_record:
            await self.pipeline.gateway.record(self.sandbox, self._communications(batch.to_record))
        timings["history"] = time.perf_counter() - started
        if batch.unsent:
            log.warning("provider unavailable", sequence=ack.sequence, unsent=batch.unsent, error=batch.error)
            raise Unavailable(
                f"the {header.channel} provider is unavailable: {batch.error}", reason="PROVIDER_UNAVAILABLE"
            )
        if batch.recipients:
            log.info(
                "batch delivered",
                sequence=ack.sequence,
                recipients=batch.recipients,
                sent=ack.sent,
                already_sent=ack.already_sent,
                skipped=dict(ack.skipped),
                failed=dict(ack.failed),
                deferred=ack.deferred,
                seconds={stage: round(t, 3) for stage, t in timings.items()},
            )
        return ack

    def _mark_one(self, marked: set[str], jobs: Mapping[str, _Job]) -> Callable[[str], None]:
        """The callback that marks one message sent (and queues its message log) in its own transaction
        as soon as the provider accepted it, on the sending thread, and adds its id to ``marked``."""
        ledger, sandbox, clock = self.pipeline.ledger, self.sandbox, self.pipeline.clock

        def mark(mid: str) -> None:
            log_event = LogEvent(sandbox, mid, "sent", clock.now(), self._logged(jobs.get(mid)))
            ledger.mark([StatusChange(mid, SENT)], [log_event])
            marked.add(mid)

        return mark

    def _logged(self, job: _Job | None) -> LoggedMessage | None:
        """What the message log of a job's message says about it (None: read from the ledger later)."""
        if job is None:
            return None
        header = self.header
        recipient = job.recipient
        return LoggedMessage(
            header.campaign,
            header.run,
            header.activity,
            header.channel,
            job.key[0],
            job.key[1],
            recipient.namespace,
            recipient.value,
        )

    def _logged_columns(self, message_ids: list[str], jobs: Mapping[str, _Job]) -> dict[str, str | list[str]] | None:
        """What the message logs of ``message_ids`` say about their messages, as the ``about`` of a
        :class:`LogGroup` (None when a message is not one of ``jobs``: read from the ledger later)."""
        picked = [jobs.get(mid) for mid in message_ids]
        if any(job is None for job in picked):
            return None
        found = cast(list[_Job], picked)
        header = self.header
        return {
            "campaign": header.campaign,
            "run": header.run,
            "activity": header.activity,
            "channel": header.channel,
            "profile_key": logged_column([job.key[0] for job in found]),
            "entity_key": logged_column([job.key[1] for job in found]),
            "identity_namespace": logged_column([job.recipient.namespace for job in found]),
            "identity_value": logged_column([job.recipient.value for job in found]),
        }

    async def _mark(
        self,
        report: DeliveryReport,
        ack: BatchAck,
        jobs: Mapping[str, _Job],
        marked: Set[str] = frozenset(),
        quarantined: Sequence[str] = (),
    ) -> None:
        """Mark the batch's outcomes (but the sends already in ``marked``), and the messages skipped as
        ``quarantined`` (never given to the provider), in one transaction and count them. The sends, most
        of a batch, are marked and logged as one group (no object per message)."""
        sent = [mid for mid in report.sent if mid not in marked] if marked else list(report.sent)
        changes = [StatusChange(mid, FAILED, reason) for mid, reason in report.failed.items()]
        if quarantined:
            changes += [StatusChange(mid, SKIPPED, QUARANTINED) for mid in quarantined]
            ack.skipped[QUARANTINED] += len(quarantined)
        now, sandbox, logged = self.pipeline.clock.now(), self.sandbox, self._logged
        logs: list[LogEvent | LogGroup] = [
            LogEvent(sandbox, mid, "failed", now, logged(jobs.get(mid))) for mid in report.failed
        ]
        if sent:
            logs.append(LogGroup(sandbox, "sent", now, sent, self._logged_columns(sent, jobs)))
        if changes or sent:
            await self.pipeline.database.run(self.pipeline.ledger.mark, changes, logs, sent=sent)
        ack.sent += len(report.sent)
        ack.failed.update(report.failed.values())

    async def _release(self, message_ids: Sequence[str]) -> None:
        """Free the capping reservations of messages that were not sent. Best effort: a reservation
        that cannot be released stops counting when it expires (logged)."""
        message_ids = list(dict.fromkeys(message_ids))
        if not message_ids:
            return
        try:
            await self.pipeline.gateway.release(self.sandbox, message_ids)
        except CarillonError as exc:
            log.warning("capping reservations not released", count=len(message_ids), error=str(exc))

    async def _quarantine(self, report: DeliveryReport, jobs: Mapping[str, _Job]) -> None:
        """Tell the profile service about addresses the provider refused permanently (a hard bounce,
        event id ``{message id}:refused``). Best effort: the ledger already holds the failure, and a
        profile service that cannot be reached only costs the quarantine (logged)."""
        forwarder = self.pipeline.forwarder
        refused = [mid for mid, reason in report.failed.items() if reason == PROVIDER_PERMANENT]
        if forwarder is None or not refused:
            return
        now = self.pipeline.clock.now()
        targets = [
            FeedbackTarget(
                event_id=f"{mid}:refused",
                kind="hard_bounce",
                message_id=mid,
                profile_key=jobs[mid].key[0],
                channel=self.header.channel,
                address=jobs[mid].verdict.address,
                event_time=now,
            )
            for mid in refused
            if mid in jobs
        ]
        try:
            await forwarder.forward(self.sandbox, targets)
        except CarillonError as exc:
            log.warning("permanent failures not forwarded to quarantine", count=len(targets), error=str(exc))

    def _entry(
        self,
        mid: str,
        key: LedgerKey,
        status: str,
        reason: str,
        recipient: Recipient,
        address: str = "",
        defer_until: datetime | None = None,
    ) -> LedgerEntry:
        header = self.header
        return LedgerEntry(
            message_id=mid,
            sandbox=self.sandbox,
            campaign=header.campaign,
            run=header.run,
            activity=header.activity,
            profile_key=key[0],
            entity_key=key[1],
            channel=header.channel,
            status=status,
            reason=reason,
            address=address,
            defer_until=defer_until,
            identity_namespace=recipient.namespace,
            identity_value=recipient.value,
        )

    def _communications(self, sent: Sequence[tuple[str, str]]) -> list[Communication]:
        header, now = self.header, utcnow()
        return [
            Communication(
                message_id=mid,
                profile_id=profile_id,
                channel=header.channel,
                category=header.category,
                campaign=header.campaign,
                run=header.run,
                activity=header.activity,
                send_time=now,
            )
            for mid, profile_id in sent
        ]

    def _render_all(
        self, jobs: Sequence[_Job], ahead: Mapping[int, OutgoingMessage | str]
    ) -> list[OutgoingMessage | str]:
        """Each job's message, or the reason it is skipped (blocking: runs on a worker thread); a message
        rendered ahead for the job's recipient under the same message id is taken as it is."""
        results: list[OutgoingMessage | str] = []
        for job in jobs:
            done = ahead.get(job.index)
            if isinstance(done, str) or (done is not None and done.message_id == job.message_id):
                results.append(done)
            else:
                results.append(self._render(job.message_id, job.recipient, job.verdict))
        return results

    def _render(self, mid: str, recipient: Recipient, verdict: Verdict) -> OutgoingMessage | str:
        """The message ``mid`` to an allowed recipient, or the reason it is skipped."""
        address = verdict.address
        profile = verdict.profile or ProfileView(profile_id="")
        context = {"profile": profile_context(profile, address), "target": dict(recipient.target)}
        try:
            parts = self.template.render(context)
            return compose(
                self.pipeline,
                self.template.template.content_kind,
                mid,
                parts,
                address,
                stream=self.extract_stream,
            )
        except InvalidAddress:
            return INVALID_ADDRESS
        except MessageTooLong:
            return MESSAGE_TOO_LONG
        except (RenderError, ValueError) as exc:
            log.info("render failed", message_id=mid, error=str(exc))
            return RENDER_ERROR


class MessageTooLong(ValueError):
    """A rendered message exceeds its channel's limit (SMS segments)."""


def compose(
    pipeline: DeliveryPipeline,
    kind: str,
    mid: str,
    parts: Mapping[str, str],
    address: str,
    *,
    stream: str = "extract",
) -> OutgoingMessage:
    """The outgoing message of rendered ``parts`` for a content kind (``stream``: the extract stream
    of a direct-mail row).

    Raises InvalidAddress, MessageTooLong, or ValueError for anything else that cannot be sent.
    """
    if kind == "direct_mail":
        if not address.strip():
            raise InvalidAddress("no postal address")
        headers = tuple(parts)
        return OutgoingRow(mid, address, headers, tuple(parts[h] for h in headers), stream)
    if kind == "push":
        if not address or len(address) > 4096 or any(c.isspace() for c in address):
            raise InvalidAddress("not a device token")
        if not parts.get("body", "").strip():
            raise ValueError("the rendered body is empty")
        data = {
            part.removeprefix(PUSH_DATA_PREFIX): text
            for part, text in parts.items()
            if part.startswith(PUSH_DATA_PREFIX)
        }
        return OutgoingPush(mid, address, parts.get("title", ""), parts["body"], parts.get("deep_link", ""), data)
    if kind == "sms":
        if not _PHONE.match(address):
            raise InvalidAddress(f"not a phone number: {address!r}")
        body = parts.get("text", "")
        if not body.strip():
            raise ValueError("the rendered text is empty")
        segments = count_segments(body)
        if segments.count > MAX_SEGMENTS:
            raise MessageTooLong(f"{segments.count} segments")
        sender = parts.get("sender") or pipeline.sender_address
        return OutgoingSms(mid, sender, address, body, segments.count)
    email: OutgoingEmail = compose_email(
        mid,
        parts,
        address,
        default_sender_name=pipeline.sender_name,
        default_sender_address=pipeline.sender_address,
    )
    return email
