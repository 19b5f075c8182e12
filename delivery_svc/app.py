"""Wiring of delivery_svc: settings → database (migrated) → templates, ledger, profile gateway,
message log flusher and provider → pipeline → servicer → server."""

from __future__ import annotations

from typing import Any

from carillon.delivery.v1 import delivery_service_pb2, delivery_service_pb2_grpc
from carillon_chassis.server import GrpcServer
from carillon_chassis.wiring import open_database, server_for
from delivery_svc import DOMAIN, SERVICE_NAME
from delivery_svc.direct_mail import DirectMailProvider, ExtractConfig
from delivery_svc.eligibility import ProfileServiceGateway
from delivery_svc.feedback import FeedbackService, ProfileFeedbackForwarder
from delivery_svc.ledger import Ledger
from delivery_svc.message_logs import AudienceMessageLogSink, MessageLogFlusher
from delivery_svc.pipeline import DeliveryPipeline
from delivery_svc.providers import (
    MessageProvider,
    OutboxMboxProvider,
    OutboxProvider,
    RetryPolicy,
    SmtpConfig,
    SmtpProvider,
)
from delivery_svc.push import ApnsProvider, FcmProvider, PushConfig
from delivery_svc.servicer import DeliveryServicer
from delivery_svc.settings import DeliverySettings
from delivery_svc.sms import TwilioConfig, TwilioSmsProvider
from delivery_svc.tables import MIGRATIONS
from delivery_svc.templates import TemplateStore

FULL_NAME = delivery_service_pb2.DESCRIPTOR.services_by_name["DeliveryService"].full_name
IMPLEMENTED_CHANNELS = ("email", "sms", "push", "direct_mail")


class ChannelNotImplemented(ValueError):
    """The worker was configured for a channel that has no implementation yet."""


def build_provider(settings: DeliverySettings) -> MessageProvider[Any]:
    """The provider of the worker's channel: for email the one the settings name."""
    if settings.channel == "sms":
        token = settings.sms_token.get_secret_value() if settings.sms_token is not None else ""
        return TwilioSmsProvider(
            TwilioConfig(settings.sms_api_url, settings.sms_account, token, timeout_s=settings.sms_timeout_s)
        )
    if settings.channel == "direct_mail":
        return DirectMailProvider(
            ExtractConfig(
                directory=settings.extract_dir or settings.data_dir / "extracts",
                prefix=settings.extract_prefix,
                delimiter=settings.extract_delimiter,
                header=settings.extract_header,
                max_rows=settings.extract_max_rows,
                sort_column=settings.extract_sort_column,
                extension="csv" if settings.extract_delimiter == "," else "txt",
            )
        )
    if settings.channel == "push":
        config = PushConfig(
            base_url=settings.push_api_url,
            token=settings.push_token.get_secret_value() if settings.push_token is not None else "",
            project=settings.push_project,
            topic=settings.push_topic,
            timeout_s=settings.push_timeout_s,
        )
        return ApnsProvider(config) if settings.push_provider == "apns" else FcmProvider(config)
    if settings.email_provider == "smtp":
        password = settings.smtp_password.get_secret_value() if settings.smtp_password is not None else None
        return SmtpProvider(
            SmtpConfig(
                host=settings.smtp_host,
                port=settings.smtp_port,
                starttls=settings.smtp_starttls,
                username=settings.smtp_username,
                password=password,
                timeout_s=settings.smtp_timeout_s,
            )
        )
    if settings.outbox_format == "mbox":
        return OutboxMboxProvider(settings.resolved_outbox_dir())
    return OutboxProvider(settings.resolved_outbox_dir())


async def build_server(settings: DeliverySettings) -> GrpcServer:
    """Create the database (applying migrations) and a server that is ready to start.

    Raises ChannelNotImplemented for a channel that has no implementation.
    """
    if settings.channel not in IMPLEMENTED_CHANNELS:
        raise ChannelNotImplemented(
            f"delivery channel {settings.channel!r} is not implemented yet "
            f"(implemented: {', '.join(IMPLEMENTED_CHANNELS)})"
        )
    database = open_database(settings, MIGRATIONS, jit=False)
    templates = TemplateStore(database)
    gateway = ProfileServiceGateway(settings.profile_target, timeout_s=settings.profile_timeout_s)
    ledger = Ledger(database, message_logs=bool(settings.audience_target))
    forwarder = ProfileFeedbackForwarder(gateway)
    sink = flusher = None
    if settings.audience_target:
        sink = AudienceMessageLogSink(settings.audience_target, timeout_s=settings.audience_timeout_s)
        flusher = MessageLogFlusher(
            database,
            sink,
            interval_s=settings.message_log_interval_s,
            retry_initial_s=settings.message_log_interval_s,
            retry_max_s=settings.message_log_retry_max_s,
        )
    pipeline = DeliveryPipeline(
        database=database,
        templates=templates,
        ledger=ledger,
        gateway=gateway,
        provider=build_provider(settings),
        channel=settings.channel,
        max_batch=settings.max_batch,
        sender_name=settings.sender_name,
        sender_address=settings.sms_sender if settings.channel == "sms" else settings.sender_address,
        retry=RetryPolicy(
            settings.send_attempts,
            settings.send_retry_initial_s,
            settings.send_retry_max_s,
            settings.resolved_retry_window(),
        ),
        max_rate=settings.max_rate_per_second,
        provider_rate=settings.provider_rate_per_second,
        forwarder=forwarder,
        log_waker=flusher,
    )
    feedback = FeedbackService(database, ledger, forwarder, log_waker=flusher)
    servicer = DeliveryServicer(templates, pipeline, ledger, feedback, gateway)

    server = server_for(
        settings,
        name=f"{SERVICE_NAME}-{settings.channel}",
        domain=DOMAIN,
        service=FULL_NAME,
        add_servicer=lambda grpc_server: delivery_service_pb2_grpc.add_DeliveryServiceServicer_to_server(
            servicer, grpc_server
        ),
        database=database,
    )
    server.on_stop(gateway.close)  # stop hooks run in reverse order: the gateway closes before the database
    if flusher is not None and sink is not None:
        server.on_start(flusher.start)
        server.on_stop(sink.close)
        server.on_stop(flusher.stop)  # stops first, then the channel closes, then the database
    return server
