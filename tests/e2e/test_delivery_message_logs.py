"""End to end: message logs from delivery reach audience_svc and become targetable.

The demo campaign runs through the four real services (the email worker sends to a real SMTP
server); opens are then reported for some of its messages through ``RecordFeedback``, and a rule on
the built-in ``message_logs`` link ("has an opened log of this campaign") selects exactly the
customers whose message was opened. Runs on both database backends.
"""

from __future__ import annotations

import asyncio

import grpc

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import query_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import delivery_service_pb2_grpc
from carillon_chassis.clients import call_metadata
from carillon_chassis.values import to_value
from carillon_cli.demo import Demo, read_rows
from tests.e2e.conftest import Stack

METADATA = call_metadata("demo")


def opened_query(campaign: str) -> query_pb2.AudienceQuery:
    """Customers with an opened message log of ``campaign``."""
    logs_filter = query_pb2.Filter(
        all=query_pb2.FilterList(
            filters=[
                query_pb2.Filter(
                    condition=query_pb2.Condition(
                        attribute="status", operator=query_pb2.OPERATOR_EQUAL, values=[to_value("opened")]
                    )
                ),
                query_pb2.Filter(
                    condition=query_pb2.Condition(
                        attribute="campaign", operator=query_pb2.OPERATOR_EQUAL, values=[to_value(campaign)]
                    )
                ),
            ]
        )
    )
    return query_pb2.AudienceQuery(
        dimension="entities/customers",
        filter=query_pb2.Filter(
            link=query_pb2.LinkCondition(link="message_logs", measure=query_pb2.LINK_MEASURE_EXISTS, filter=logs_filter)
        ),
    )


async def evaluate(stub: aud_grpc.AudienceServiceStub, query: query_pb2.AudienceQuery) -> list[str]:
    response = await stub.EvaluateAudience(
        aud.EvaluateAudienceRequest(query=query, sample_size=1000), metadata=METADATA
    )
    return list(response.sample_keys)


async def test_customers_whose_email_was_opened_are_exactly_those_a_message_log_rule_selects(stack: Stack) -> None:
    demo = Demo(stack.endpoints, sandbox="demo")
    try:
        result = await demo.run(say=lambda _line: None)
    finally:
        await demo.close()
    assert result.state == "RUN_STATE_SUCCEEDED", result.error
    by_email = {c["email"]: c["customer_id"] for c in read_rows("customers") if c["email"]}
    mails = sorted(stack.smtp.messages, key=lambda m: m.recipients[0])
    opened = mails[::5]  # every fifth recipient opens the email
    assert len(opened) >= 3
    campaign = result.campaign

    async with (
        grpc.aio.insecure_channel(stack.endpoints.delivery) as delivery_channel,
        grpc.aio.insecure_channel(stack.endpoints.audience) as audience_channel,
    ):
        delivery = delivery_service_pb2_grpc.DeliveryServiceStub(delivery_channel)
        audience = aud_grpc.AudienceServiceStub(audience_channel)
        await delivery.RecordFeedback(
            dpb.RecordFeedbackRequest(
                events=[
                    dpb.FeedbackEvent(
                        event_id=f"open-{i}",
                        message_id=str(mail.message["X-Carillon-Message-Id"]),
                        kind=dpb.FEEDBACK_KIND_OPENED,
                    )
                    for i, mail in enumerate(opened)
                ]
            ),
            metadata=METADATA,
        )
        expected = sorted(by_email[mail.recipients[0]] for mail in opened)
        query = opened_query(campaign)
        found: list[str] = []
        for _ in range(200):  # the logs are flushed in the background, within moments
            found = await evaluate(audience, query)
            if len(found) >= len(expected):
                break
            await asyncio.sleep(0.05)
        sent_logs = await audience.EvaluateAudience(
            aud.EvaluateAudienceRequest(query=query_pb2.AudienceQuery(dimension="entities/message_logs")),
            metadata=METADATA,
        )

    assert found == expected
    assert sent_logs.count == len(stack.smtp.messages) + len(opened)  # one sent log per email, one per open
