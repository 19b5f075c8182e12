"""The DeliveryService servicer: translates protobuf requests to domain calls and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import grpc

from carillon.delivery.v1 import delivery_service_pb2, delivery_service_pb2_grpc, template_pb2
from carillon.type.v1 import channel_pb2
from carillon_chassis.channels import category_name, channel_name, channel_value
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.names import parse_name
from carillon_chassis.pagination import page_size
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_value_map, to_timestamp
from delivery_svc.pipeline import BatchAck, DeliveryPipeline, Recipient, SendHeader, SendSession
from delivery_svc.templates import CONTENT_PARTS, Template, TemplateStore


def template_from_proto(message: template_pb2.Template) -> Template:
    """The domain template of a Template message (its name and create time are ignored)."""
    kind = message.WhichOneof("content") or ""
    content: dict[str, str] = {}
    if kind:
        parts = getattr(message, kind)
        content = {part: getattr(parts, part) for part in CONTENT_PARTS.get(kind, ())}
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
    if template.create_time is not None:
        message.create_time.CopyFrom(to_timestamp(template.create_time))
    return message


def header_from_proto(message: delivery_service_pb2.SendHeader) -> SendHeader:
    """The domain header of a SendHeader message."""
    return SendHeader(
        campaign=message.campaign,
        run=message.run,
        activity=message.activity,
        channel=channel_name(message.channel),
        category=category_name(message.category),
        template=message.template,
    )


def recipients_from_proto(batch: delivery_service_pb2.RecipientBatch) -> list[Recipient]:
    """The domain recipients of a RecipientBatch message."""
    return [
        Recipient(
            namespace=r.identity.namespace,
            value=r.identity.value,
            entity_key=r.entity_key,
            target=from_value_map(r.target),
        )
        for r in batch.recipients
    ]


def ack_to_proto(ack: BatchAck) -> delivery_service_pb2.SendResponse:
    """The SendResponse message of a batch acknowledgement."""
    return delivery_service_pb2.SendResponse(
        sequence=ack.sequence,
        sent=ack.sent,
        already_sent=ack.already_sent,
        skipped=dict(ack.skipped),
        failed=dict(ack.failed),
    )


class DeliveryServicer(delivery_service_pb2_grpc.DeliveryServiceServicer):
    """DeliveryService over a TemplateStore and a DeliveryPipeline."""

    def __init__(self, templates: TemplateStore, pipeline: DeliveryPipeline) -> None:
        self.templates = templates
        self.pipeline = pipeline

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
        sandbox = current_sandbox()
        session: SendSession | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if session is None:
                if kind != "header":
                    raise InvalidArgument(
                        "the first message of a Send stream must carry the header",
                        field="header",
                        reason="HEADER_REQUIRED",
                    )
                session = await self.pipeline.open(sandbox, header_from_proto(request.header))
                continue
            if kind != "batch":
                field_name = "header" if kind == "header" else "batch"
                raise InvalidArgument(
                    "every message after the header must carry a batch", field=field_name, reason="BATCH_REQUIRED"
                )
            ack = await session.deliver(request.batch.sequence, recipients_from_proto(request.batch))
            yield ack_to_proto(ack)
