"""End to end: the demo campaign through the four real services to a real SMTP server.

Runs on both database backends. Asserts the exact set of addresses that received the email, that
nobody without opt-in consent received anything, that every service is SERVING and reflectable, and
that bad input is refused with INVALID_ARGUMENT naming the field and writes nothing.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import entity_pb2, query_pb2
from carillon.scheduler.v1 import run_pb2
from carillon_chassis.clients import call_metadata
from carillon_chassis.values import to_value
from carillon_cli.demo import Demo, expected_recipients, read_rows
from carillon_cli.endpoints import GRPC_SERVICES
from tests.e2e.conftest import Stack
from tests.rpc_errors import failure_of


async def run_demo(stack: Stack) -> object:
    demo = Demo(stack.endpoints, sandbox="demo")
    try:
        return await demo.run(say=lambda _line: None)
    finally:
        await demo.close()


def audience_rows() -> list[dict[str, str]]:
    """Customers in the demo audience (gold or platinum, outside the US)."""
    return [c for c in read_rows("customers") if c["loyalty_tier"] in ("gold", "platinum") and c["country"] != "US"]


async def test_demo_campaign_emails_exactly_the_opted_in_members_of_the_audience(stack: Stack) -> None:
    result = await run_demo(stack)

    assert result.state == "RUN_STATE_SUCCEEDED", result.error  # type: ignore[attr-defined]
    received = stack.smtp.recipients()
    assert Counter(received) == Counter(expected_recipients())  # each exactly once
    assert len(received) > 20


async def test_customers_without_opt_in_receive_nothing(stack: Stack) -> None:
    await run_demo(stack)

    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    not_opted_in = {c["email"] for c in audience_rows() if c["email"] and consent[c["customer_id"]] != "opted_in"}
    assert not_opted_in, "the dataset must contain opted-out audience members for this test to mean anything"
    assert not_opted_in.isdisjoint(stack.smtp.recipients())


async def test_run_counts_match_the_dataset(stack: Stack) -> None:
    result = await run_demo(stack)

    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    members = audience_rows()
    tasks = {t.activity: t for t in result.tasks}  # type: ignore[attr-defined]
    assert tasks["audience"].targeted == len(members)
    email = tasks["email"]
    assert email.state == run_pb2.TASK_STATE_SUCCEEDED
    assert email.targeted == len(members)
    assert email.sent == len(expected_recipients())
    no_address = [c for c in members if not c["email"]]
    no_consent = [c for c in members if c["email"] and consent[c["customer_id"]] != "opted_in"]
    assert dict(email.skipped) == {
        k: v for k, v in {"MISSING_ADDRESS": len(no_address), "NO_CONSENT": len(no_consent)}.items() if v
    }
    assert email.checkpoint == len(members)


async def test_each_email_is_personalised_for_its_recipient(stack: Stack) -> None:
    await run_demo(stack)

    by_email = {c["email"]: c for c in read_rows("customers") if c["email"]}
    assert stack.smtp.messages
    for mail in stack.smtp.messages:
        customer = by_email[mail.recipients[0]]
        assert mail.message["Subject"].startswith(f"{customer['first_name']},")
        body = mail.message.get_body(preferencelist=("plain",))
        assert body is not None
        text = body.get_content()
        assert f"Hi {customer['first_name']}," in text
        assert f"As a {customer['loyalty_tier']} member" in text


@pytest.mark.parametrize("service", sorted(GRPC_SERVICES))
async def test_every_service_is_serving_and_listed_by_reflection(stack: Stack, service: str) -> None:
    async with grpc.aio.insecure_channel(stack.endpoints.of(service)) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=GRPC_SERVICES[service])
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [
            reply
            async for reply in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        names = {s.name for s in replies[0].list_services_response.service}
        assert GRPC_SERVICES[service] in names
        assert "grpc.health.v1.Health" in names


async def test_unknown_attribute_in_a_filter_is_invalid_argument_naming_the_field(stack: Stack) -> None:
    await run_demo(stack)
    query = query_pb2.AudienceQuery(
        dimension="entities/customers",
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                attribute="shoe_size", operator=query_pb2.OPERATOR_EQUAL, values=[to_value(42)]
            )
        ),
    )
    async with grpc.aio.insecure_channel(stack.endpoints.audience) as channel:
        stub = aud_grpc.AudienceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.BuildWorkingSet(
                aud.BuildWorkingSetRequest(run="campaigns/bad/runs/r1", activity="a", query=query),
                metadata=call_metadata("demo"),
            )
        failure = failure_of(caught.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.domain == "audience.carillon.dev"
        assert any(f.endswith("condition.attribute") for f in failure.fields), failure.fields
        # nothing was written: the run has no working set
        with pytest.raises(grpc.aio.AioRpcError) as retry:
            await stub.BuildWorkingSet(
                aud.BuildWorkingSetRequest(run="campaigns/bad/runs/r1", activity="a", query=query),
                metadata=call_metadata("demo"),
            )
        assert retry.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_entity_without_primary_key_is_refused_and_nothing_is_created(stack: Stack) -> None:
    entity = entity_pb2.Entity(
        attributes=[
            entity_pb2.Attribute(name="sku", type=entity_pb2.ATTRIBUTE_TYPE_STRING),
            entity_pb2.Attribute(name="version", type=entity_pb2.ATTRIBUTE_TYPE_INTEGER),
        ],
        version_attribute="version",
    )
    async with grpc.aio.insecure_channel(stack.endpoints.audience) as channel:
        stub = aud_grpc.AudienceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateEntity(
                aud.CreateEntityRequest(entity_id="products", entity=entity), metadata=call_metadata("demo")
            )
        failure = failure_of(caught.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "entity.primary_key" in failure.fields
        listed = await stub.ListEntities(aud.ListEntitiesRequest(), metadata=call_metadata("demo"))
        assert "entities/products" not in {e.name for e in listed.entities}
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetEntity(aud.GetEntityRequest(name="entities/products"), metadata=call_metadata("demo"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sandboxes_do_not_see_each_other(stack: Stack) -> None:
    await run_demo(stack)
    async with grpc.aio.insecure_channel(stack.endpoints.audience) as channel:
        stub = aud_grpc.AudienceServiceStub(channel)
        demo = await stub.ListEntities(aud.ListEntitiesRequest(), metadata=call_metadata("demo"))
        prod = await stub.ListEntities(aud.ListEntitiesRequest(), metadata=call_metadata("prod"))
    # Every sandbox has the built-in message logs; the user entities stay in their own sandbox.
    assert {e.name for e in demo.entities} == {"entities/customers", "entities/bookings", "entities/message_logs"}
    assert [e.name for e in prod.entities] == ["entities/message_logs"]


def test_bundled_dataset_has_the_cases_the_demo_needs() -> None:
    profiles = list(csv.DictReader((Path(__file__).parents[2] / "carillon_cli/data/profiles.csv").open()))
    states = Counter(p["email_consent"] for p in profiles)
    assert len(profiles) >= 200
    assert states["opted_in"] and states["opted_out"] and states["unknown"]
    assert any(not p["email"] for p in profiles)
