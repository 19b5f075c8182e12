"""The DeliveryService servicer: translates protobuf requests to domain calls and back."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc
import structlog

from carillon.delivery.v1 import delivery_service_pb2, delivery_service_pb2_grpc, template_pb2
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.channels import category_name, channel_name, channel_value
from carillon_chassis.errors import CarillonError, InvalidArgument, to_status
from carillon_chassis.names import parse_name, validate_id
from carillon_chassis.pagination import page_size
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_nested_value, from_timestamp, from_value_map, to_timestamp
from delivery_svc import DOMAIN
from delivery_svc.eligibility import ProfileView
from delivery_svc.feedback import FeedbackService, IncomingEvent
from delivery_svc.ledger import ActivityReport, Ledger
from delivery_svc.pipeline import (
    BatchAck,
    Checked,
    DeliveryPipeline,
    Prepared,
    Recipient,
    SendHeader,
    SendSession,
    SentBatch,
)
from delivery_svc.sms import count_segments
from delivery_svc.templates import CONTENT_PARTS, PUSH_DATA_PREFIX, Template, TemplateStore
from delivery_svc.windows import SendWindow, parse_local_time

T = TypeVar("T")
log = structlog.get_logger("carillon.delivery")


@dataclass(frozen=True)
class _Batch:
    """A batch read ahead from a Send stream, its eligibility check started."""

    sequence: int
    recipients: list[Recipient]
    checked: Checked


class _End:
    """The Send stream ended cleanly."""


_Ahead = _Batch | _End | Exception


class _Event(enum.Enum):
    """What else a Send stream's loop may wake up for."""

    FINISHED = "a batch's finish ended: its acknowledgement is due"
    TRANSMITTED = "a batch's transmission ended: its finish can start"


_FINISHED, _TRANSMITTED = _Event.FINISHED, _Event.TRANSMITTED
_BACKGROUND: set[asyncio.Future[None]] = set()

# How long a refused Send stream waits for its client to half-close before it ends with its status. A
# client that accepts refusals half-closes as soon as it reads one; one that does not (stuck, or
# waiting for something else) must not hold the stream open for longer than this.
REFUSAL_GRACE_S = 10.0


def _background(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` on its own, keeping a reference until it is done."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


FEEDBACK_KIND_NAMES = {
    delivery_service_pb2.FEEDBACK_KIND_DELIVERED: "delivered",
    delivery_service_pb2.FEEDBACK_KIND_OPENED: "opened",
    delivery_service_pb2.FEEDBACK_KIND_CLICKED: "clicked",
    delivery_service_pb2.FEEDBACK_KIND_SOFT_BOUNCE: "soft_bounce",
    delivery_service_pb2.FEEDBACK_KIND_HARD_BOUNCE: "hard_bounce",
    delivery_service_pb2.FEEDBACK_KIND_COMPLAINT: "complaint",
    delivery_service_pb2.FEEDBACK_KIND_UNSUBSCRIBE: "unsubscribe",
}


def template_from_proto(message: template_pb2.Template) -> Template:
    """The domain template of a Template message (its name and create time are ignored)."""
    kind = message.WhichOneof("content") or ""
    content: dict[str, str] = {}
    if kind == "direct_mail":
        headers = [c.header for c in message.direct_mail.columns]
        if len(set(headers)) != len(headers):
            raise InvalidArgument(
                "column headers must be unique", field="template.direct_mail.columns", reason="INVALID_TEMPLATE"
            )
        content = {c.header: c.value for c in message.direct_mail.columns}
    elif kind:
        parts = getattr(message, kind)
        content = {part: getattr(parts, part) for part in CONTENT_PARTS.get(kind, ())}
        if kind == "push":
            content.update({PUSH_DATA_PREFIX + key: value for key, value in sorted(message.push.data.items())})
    return Template(
        template_id="",
        channel=channel_name(message.channel),
        content_kind=kind,
        content=content,
        display_name=message.display_name,
    )


def template_to_proto(template: Template) -> template_pb2.Template:
    """The Template message of a domain template."""
    message = template_pb2.Template(
        name=template.name,
        channel=cast(channel_pb2.Channel.ValueType, channel_value(template.channel)),
        display_name=template.display_name,
    )
    if template.content_kind == "email":
        message.email.CopyFrom(template_pb2.EmailContent(**template.content))
    elif template.content_kind == "sms":
        message.sms.CopyFrom(template_pb2.SmsContent(**template.content))
    elif template.content_kind == "push":
        fixed = {part: text for part, text in template.content.items() if not part.startswith(PUSH_DATA_PREFIX)}
        data = {
            part.removeprefix(PUSH_DATA_PREFIX): text
            for part, text in template.content.items()
            if part.startswith(PUSH_DATA_PREFIX)
        }
        message.push.CopyFrom(template_pb2.PushContent(**fixed, data=data))
    elif template.content_kind == "direct_mail":
        message.direct_mail.columns.extend(
            template_pb2.DirectMailColumn(header=h, value=v) for h, v in template.content.items()
        )
    if template.create_time is not None:
        message.create_time.CopyFrom(to_timestamp(template.create_time))
    return message


def window_from_proto(message: delivery_service_pb2.SendWindow) -> SendWindow:
    """The domain send window of a SendWindow message; INVALID_ARGUMENT naming the bad fields."""
    days = list(message.days_of_week)
    violations = SendWindow.check(
        message.start_local_time, message.end_local_time, days, message.default_time_zone, "header.send_window"
    )
    start, end = parse_local_time(message.start_local_time), parse_local_time(message.end_local_time)
    if violations or start is None or end is None:
        raise InvalidArgument("invalid send window", violations=violations, reason="INVALID_HEADER")
    return SendWindow(start, end, frozenset(days), message.default_time_zone or "UTC")


def header_from_proto(message: delivery_service_pb2.SendHeader) -> SendHeader:
    """The domain header of a SendHeader message."""
    return SendHeader(
        campaign=message.campaign,
        run=message.run,
        activity=message.activity,
        channel=channel_name(message.channel),
        category=category_name(message.category),
        template=message.template,
        rate_limit_per_second=message.rate_limit_per_second,
        window=window_from_proto(message.send_window) if message.HasField("send_window") else None,
    )


def recipients_from_proto(batch: delivery_service_pb2.RecipientBatch) -> list[Recipient]:
    """The domain recipients of a RecipientBatch message."""
    recipients = []
    for r in batch.recipients:
        identity = r.identity
        recipients.append(Recipient(identity.namespace, identity.value, r.entity_key, _target(r.target)))
    return recipients


def _target(values: Mapping[str, value_pb2.Value]) -> dict[str, Any]:
    """:func:`from_value_map` of a recipient's target, with its usual values (strings) read directly
    (a quarter of the cost: one target per recipient)."""
    target: dict[str, Any] = {}
    for key in values:
        value = values[key]
        target[key] = value.string_value if value.WhichOneof("kind") == "string_value" else from_nested_value(value)
    return target


def ack_to_proto(ack: BatchAck) -> delivery_service_pb2.SendResponse:
    """The SendResponse message of a batch acknowledgement."""
    response = delivery_service_pb2.SendResponse(
        sequence=ack.sequence,
        sent=ack.sent,
        already_sent=ack.already_sent,
        skipped=dict(ack.skipped),
        failed=dict(ack.failed),
        deferred=ack.deferred,
    )
    if ack.next_window_time is not None:
        response.next_window_time.CopyFrom(to_timestamp(ack.next_window_time))
    return response


def refusal_to_proto(error: CarillonError) -> delivery_service_pb2.SendResponse:
    """The last SendResponse of a stream refused with ``error``: the status the stream then ends with."""
    status = to_status(error, DOMAIN)
    refusal = delivery_service_pb2.SendRefusal(code=status.code, message=status.message, details=status.details)
    return delivery_service_pb2.SendResponse(refusal=refusal)


def events_from_proto(request: delivery_service_pb2.RecordFeedbackRequest) -> list[IncomingEvent]:
    """The domain events of a RecordFeedbackRequest (an unset kind becomes "", refused later)."""
    return [
        IncomingEvent(
            event_id=e.event_id,
            message_id=e.message_id,
            kind=FEEDBACK_KIND_NAMES.get(e.kind, ""),
            event_time=from_timestamp(e.event_time) if e.HasField("event_time") else None,
            detail=e.detail,
        )
        for e in request.events
    ]


def report_to_proto(run: str, activity: str, report: ActivityReport) -> delivery_service_pb2.DeliveryReport:
    """The DeliveryReport message of an activity report."""
    return delivery_service_pb2.DeliveryReport(
        run=run,
        activity=activity,
        targeted=report.targeted,
        sent=report.sent,
        skipped=report.skipped,
        failed=report.failed,
        deferred=report.deferred,
        pending=report.pending,
        delivered=report.delivered,
        opened=report.opened,
        clicked=report.clicked,
        bounced=report.bounced,
        complained=report.complained,
        unsubscribed=report.unsubscribed,
    )


class ProfileLookup(Protocol):
    """How a preview gets its profile."""

    async def get_profile(self, sandbox: str, profile_id: str) -> ProfileView:
        """One profile; NOT_FOUND when missing."""
        ...


class DeliveryServicer(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """DeliveryService over a TemplateStore and a DeliveryPipeline."""

    def __init__(
        self,
        templates: TemplateStore,
        pipeline: DeliveryPipeline,
        ledger: Ledger,
        feedback: FeedbackService,
        profiles: ProfileLookup | None = None,
    ) -> None:
        self.profiles = profiles
        self.templates = templates
        self.pipeline = pipeline
        self.ledger = ledger
        self.feedback = feedback

    async def CreateTemplate(
        self, request: delivery_service_pb2.CreateTemplateRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.CreateTemplateResponse:
        template = template_from_proto(request.template)
        created = await self.templates.database.run(
            self.templates.create, current_sandbox(), request.template_id, template
        )
        return delivery_service_pb2.CreateTemplateResponse(template=template_to_proto(created))

    async def GetTemplate(
        self, request: delivery_service_pb2.GetTemplateRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.GetTemplateResponse:
        (template_id,) = parse_name(request.name, "templates")
        template = await self.templates.database.run(self.templates.get, current_sandbox(), template_id)
        return delivery_service_pb2.GetTemplateResponse(template=template_to_proto(template))

    async def ListTemplates(
        self, request: delivery_service_pb2.ListTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.ListTemplatesResponse:
        size = page_size(request.page_size)
        templates, next_token = await self.templates.database.run(
            self.templates.list, current_sandbox(), size, request.page_token
        )
        return delivery_service_pb2.ListTemplatesResponse(
            templates=[template_to_proto(t) for t in templates], next_page_token=next_token
        )

    async def Send(
        self,
        request_iterator: AsyncIterator[delivery_service_pb2.SendRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[delivery_service_pb2.SendResponse]:
        """Deliver a stream's batches in order, acknowledging each once it is final.

        Four batches overlap at most: while batch n is transmitted (the provider, then its ledger marks),
        batch n+1 is prepared (ledger lookup, rendering, ledger write; see SendSession.prepare for the
        one case where it waits), the communications of batch n-1 are recorded (its acknowledgement
        follows, in order), and the eligibility check of batch n+2, read ahead from the stream, runs.
        Batches are transmitted one at a time, in order. A bad batch is refused (its error ends the
        stream) after the batches before it are acknowledged.

        A refused stream (a bad header or batch, or any other CarillonError that ends it) whose header
        sets ``accepts_refusal`` gets a last response carrying the refusal's status, then is read to its
        end (see :meth:`_drain`) before the error ends it: grpcio's asyncio client reports INTERNAL
        instead of the status it received when it is still writing as the stream ends (grpc/grpc#36066),
        so a client that reads the refusal half-closes first and then gets the status intact."""
        sandbox = current_sandbox()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument(
                "the first message of a Send stream must carry the header", field="header", reason="HEADER_REQUIRED"
            )
        # A client that predates refusals would read one as an acknowledgement: it gets the status alone.
        accepts_refusal = first.header.accepts_refusal
        try:
            session = await self.pipeline.open(sandbox, header_from_proto(first.header))
        except CarillonError as refused:
            if accepts_refusal:
                yield refusal_to_proto(refused)
                await self._drain(requests, None)
            raise
        ahead: asyncio.Queue[_Ahead] = asyncio.Queue(maxsize=1)
        reader = asyncio.ensure_future(self._read_ahead(session, requests, ahead))
        try:
            async with contextlib.aclosing(self._deliver(session, reader, ahead)) as responses:
                async for response in responses:
                    yield response
        except CarillonError as refused:  # after the cleanup: no batch is left waiting for the client
            if accepts_refusal:
                yield refusal_to_proto(refused)
                await self._drain(requests, reader)
            raise

    async def _deliver(
        self, session: SendSession, reader: asyncio.Future[None], ahead: asyncio.Queue[_Ahead]
    ) -> AsyncGenerator[delivery_service_pb2.SendResponse, None]:
        """The acknowledgements of the batches that ``reader`` queues in ``ahead`` (see :meth:`Send`);
        whatever error ends the stream is raised once every batch is finished or released."""
        transmitting: asyncio.Future[SentBatch] | None = None
        unfinished: SentBatch | None = None  # transmitted, its finish not started yet
        finishing: asyncio.Future[BatchAck] | None = None
        prepared: Prepared | None = None  # prepared, not yet transmitting
        try:
            while True:
                item = await self._next(ahead, finishing, transmitting)
                if item is _FINISHED:  # the batch before is final: acknowledge it
                    assert finishing is not None
                    ack = finishing.result()
                    finishing = None
                    yield ack_to_proto(ack)
                    continue
                if isinstance(item, _Batch):
                    preparing = asyncio.ensure_future(session.prepare(item.sequence, item.recipients, item.checked))
                    try:
                        prepared = await self._deliver_to_the_end(preparing)
                    except asyncio.CancelledError:  # prepared all the same: released below, never transmitted
                        if not preparing.cancelled() and preparing.exception() is None:
                            prepared = preparing.result()
                        raise
                if transmitting is not None:  # the batch before, transmitted (or now awaited): its finish starts
                    sent = unfinished = await self._deliver_to_the_end(transmitting)
                    transmitting = None
                    if finishing is not None:
                        yield ack_to_proto(await self._deliver_to_the_end(finishing))
                        finishing = None
                    unfinished = None
                    if sent.unsent:  # the provider went away: nothing more is sent before this batch's error
                        await self._deliver_to_the_end(session.finish(sent))
                    finishing = asyncio.ensure_future(session.finish(sent))
                if item is _TRANSMITTED:
                    continue
                if isinstance(item, BaseException):
                    if finishing is not None:
                        yield ack_to_proto(await self._deliver_to_the_end(finishing))
                        finishing = None
                    raise item
                if isinstance(item, _End):
                    break
                assert prepared is not None
                transmitting, prepared = session.start_transmit(prepared), None
            if finishing is not None:
                yield ack_to_proto(await self._deliver_to_the_end(finishing))
                finishing = None
            await session.close()
        finally:
            reader.cancel()
            abandoned: list[asyncio.Future[Any]] = []
            while not ahead.empty():  # batches read ahead that will not be sent
                left = ahead.get_nowait()
                if isinstance(left, _Batch):
                    abandoned.append(asyncio.ensure_future(session.abandon(left.checked)))
            if prepared is not None:  # prepared, never transmitted: its pending rows are sent on replay
                abandoned.append(asyncio.ensure_future(session.release_prepared(prepared)))
            if transmitting is not None:  # the stream went away: the batch in flight completes and records
                await asyncio.wait({transmitting})
                if not transmitting.cancelled() and transmitting.exception() is None:
                    abandoned.append(asyncio.ensure_future(session.finish(transmitting.result())))
            if unfinished is not None:  # transmitted while the batch before was acknowledged: it records too
                abandoned.append(asyncio.ensure_future(session.finish(unfinished)))
            if finishing is not None:  # the stream went away: the batch still records what it sent
                await asyncio.wait({finishing})
            if abandoned:
                await asyncio.wait(abandoned)

    @staticmethod
    async def _read_ahead(
        session: SendSession,
        requests: AsyncIterator[delivery_service_pb2.SendRequest],
        ahead: asyncio.Queue[_Ahead],
    ) -> None:
        """Read the stream's batches, start each one's check at once, and queue them (one waits at most)."""
        try:
            while (request := await DeliveryServicer._next_request(requests)) is not None:
                kind = request.WhichOneof("kind")
                if kind != "batch":
                    field_name = "header" if kind == "header" else "batch"
                    raise InvalidArgument(
                        "every message after the header must carry a batch", field=field_name, reason="BATCH_REQUIRED"
                    )
                recipients = recipients_from_proto(request.batch)
                checked = session.start_check(recipients)
                try:
                    await ahead.put(_Batch(request.batch.sequence, recipients, checked))
                except asyncio.CancelledError:  # the stream ended first: this batch will not be sent
                    _background(session.abandon(checked))
                    raise
            await ahead.put(_End())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an invalid batch, or the stream broke: raised after the batches before it
            await ahead.put(exc)

    @staticmethod
    async def _next_request(
        requests: AsyncIterator[delivery_service_pb2.SendRequest],
    ) -> delivery_service_pb2.SendRequest | None:
        """The stream's next request, or None at its end; a cancellation waits for the read to end.

        gRPC's request iterator cannot be read again once a read is cut off half way, and a refused
        stream is read to its end (:meth:`_drain`) after its reader was cancelled."""
        reading = asyncio.ensure_future(anext(requests, None))
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            await asyncio.wait({reading})
            if not reading.cancelled():
                reading.exception()  # retrieved: whatever it read, the stream is ending
            raise

    @staticmethod
    async def _drain(
        requests: AsyncIterator[delivery_service_pb2.SendRequest], reader: asyncio.Future[None] | None
    ) -> None:
        """Read and discard what a refused stream's client still writes, until it half-closes.

        The client reads the refusal, stops writing and half-closes; the status that ends the stream
        then reaches it intact (grpc/grpc#36066). The request iterator has one reader at a time, so this
        waits for the read-ahead ``reader`` to stop first. A client that does not half-close gets the
        status after REFUSAL_GRACE_S all the same."""
        try:
            async with asyncio.timeout(REFUSAL_GRACE_S):
                if reader is not None:
                    await asyncio.wait({reader})
                async for _ in requests:
                    pass
        except TimeoutError:
            log.info("a refused stream's client did not half-close", grace_s=REFUSAL_GRACE_S)

    @staticmethod
    async def _next(
        ahead: asyncio.Queue[_Ahead],
        finishing: asyncio.Future[BatchAck] | None,
        transmitting: asyncio.Future[SentBatch] | None,
    ) -> _Ahead | _Event:
        """What comes first: the next batch read ahead, the end of the batch being finished
        (``_FINISHED``: its acknowledgement is due) or of the one being transmitted (``_TRANSMITTED``:
        its finish can start). A client that waits for an acknowledgement before it sends more gets it
        without sending more."""
        if finishing is not None and finishing.done():
            return _FINISHED
        if transmitting is not None and transmitting.done():
            return _TRANSMITTED
        if not ahead.empty():
            return ahead.get_nowait()
        getting = asyncio.ensure_future(ahead.get())
        try:
            waiting: set[asyncio.Future[Any]] = {getting}
            waiting |= {f for f in (finishing, transmitting) if f is not None}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        return _FINISHED if finishing is not None and finishing.done() else _TRANSMITTED

    @staticmethod
    async def _deliver_to_the_end(work: Coroutine[Any, Any, T] | asyncio.Future[T]) -> T:
        """Run one batch's step so that a cancelled stream cannot cut it off half way.

        When the caller goes away (a scheduler killed mid-run), gRPC cancels this handler. A batch
        cut off between the provider's acceptance and the ledger's ``sent`` mark would leave its rows
        ``pending`` and be sent again on replay; so each step runs in its own task, shielded, and the
        cancellation takes effect only once the step is final.
        """
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.warning("batch failed after its stream was cancelled", error=repr(task.exception()))
            raise

    async def RecordFeedback(
        self, request: delivery_service_pb2.RecordFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.RecordFeedbackResponse:
        result = await self.feedback.record(current_sandbox(), events_from_proto(request))
        return delivery_service_pb2.RecordFeedbackResponse(recorded=result.recorded, duplicates=result.duplicates)

    async def GetDeliveryReport(
        self, request: delivery_service_pb2.GetDeliveryReportRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.GetDeliveryReportResponse:
        parse_name(request.run, "campaigns", "runs", field="run")
        validate_id(request.activity, "activity")
        report = await self.ledger.database.run(self.ledger.report, current_sandbox(), request.run, request.activity)
        return delivery_service_pb2.GetDeliveryReportResponse(
            report=report_to_proto(request.run, request.activity, report)
        )

    async def PreviewMessage(
        self, request: delivery_service_pb2.PreviewMessageRequest, context: grpc.aio.ServicerContext
    ) -> delivery_service_pb2.PreviewMessageResponse:
        sandbox = current_sandbox()
        profile = ProfileView(profile_id="")
        if request.profile:
            (profile_id,) = parse_name(request.profile, "profiles", field="profile")
            if self.profiles is None:
                raise InvalidArgument("this worker cannot look profiles up", field="profile")
            profile = await self.profiles.get_profile(sandbox, profile_id)
        kind, parts = await self.pipeline.preview(sandbox, request.template, profile, from_value_map(request.target))
        response = delivery_service_pb2.PreviewMessageResponse(parts=parts)
        if kind == "sms":
            segments = count_segments(parts.get("text", ""))
            response.sms_segments, response.sms_encoding = segments.count, segments.encoding
        return response
