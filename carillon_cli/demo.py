"""``carillon demo``: load the bundled sample data through the API and run a campaign end to end.

The dataset (``carillon_cli/data``): 300 customers with hotel bookings, and their profiles — most
opted in to email, some opted out, some never answered, a few without an email address. The demo
creates the ``customers`` and ``bookings`` entities, ingests both, loads the profiles and consents,
creates an email template, evaluates the audience, then creates and publishes the campaign
"gold and platinum members outside the US get an offer" and follows its run until it ends.
Everything goes through the public gRPC API; running the demo again reuses what exists.
"""

from __future__ import annotations

import asyncio
import csv
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from importlib import resources
from typing import Any

import grpc

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import entity_pb2, query_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import delivery_service_pb2_grpc as dlv_grpc
from carillon.delivery.v1 import template_pb2
from carillon.profile.v1 import profile_pb2
from carillon.profile.v1 import profile_service_pb2 as prf
from carillon.profile.v1 import profile_service_pb2_grpc as prf_grpc
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.scheduler.v1 import scheduler_service_pb2_grpc as sch_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.clients import call_metadata, open_channel
from carillon_chassis.values import to_value
from carillon_cli.endpoints import Endpoints

A = entity_pb2.Attribute
T = entity_pb2
TEMPLATE = "templates/demo-offer"
DEMO_TIERS = ("gold", "platinum")
EXCLUDED_COUNTRY = "US"

CUSTOMERS = entity_pb2.Entity(
    display_name="Customers",
    attributes=[
        A(name="customer_id", type=T.ATTRIBUTE_TYPE_STRING),
        A(name="email", type=T.ATTRIBUTE_TYPE_STRING, nullable=True),
        A(name="first_name", type=T.ATTRIBUTE_TYPE_STRING, nullable=True),
        A(name="last_name", type=T.ATTRIBUTE_TYPE_STRING, nullable=True),
        A(
            name="loyalty_tier",
            type=T.ATTRIBUTE_TYPE_ENUM,
            enum_values=["bronze", "silver", "gold", "platinum"],
        ),
        A(name="country", type=T.ATTRIBUTE_TYPE_STRING),
        A(name="signup_date", type=T.ATTRIBUTE_TYPE_DATE),
        A(name="version", type=T.ATTRIBUTE_TYPE_INTEGER),
    ],
    primary_key=["customer_id"],
    version_attribute="version",
    identity=entity_pb2.IdentityBinding(attribute="customer_id", namespace="crm_id"),
)

BOOKINGS = entity_pb2.Entity(
    display_name="Hotel bookings",
    attributes=[
        A(name="booking_id", type=T.ATTRIBUTE_TYPE_STRING),
        A(name="customer_id", type=T.ATTRIBUTE_TYPE_STRING),
        A(name="hotel_city", type=T.ATTRIBUTE_TYPE_STRING),
        A(name="check_in", type=T.ATTRIBUTE_TYPE_DATE),
        A(name="nights", type=T.ATTRIBUTE_TYPE_INTEGER),
        A(name="amount", type=T.ATTRIBUTE_TYPE_DECIMAL),
        A(name="version", type=T.ATTRIBUTE_TYPE_INTEGER),
    ],
    primary_key=["booking_id"],
    version_attribute="version",
)

_PARSERS: dict[int, Callable[[str], Any]] = {
    T.ATTRIBUTE_TYPE_INTEGER: int,
    T.ATTRIBUTE_TYPE_DECIMAL: Decimal,
    T.ATTRIBUTE_TYPE_DATE: date.fromisoformat,
}


def read_rows(name: str) -> list[dict[str, str]]:
    """The rows of one bundled CSV file (``customers``, ``bookings`` or ``profiles``)."""
    text = (resources.files("carillon_cli") / "data" / f"{name}.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def typed_row(entity: entity_pb2.Entity, row: dict[str, str]) -> dict[str, value_pb2.Value]:
    """A CSV row as typed Values (an empty cell of a nullable attribute is NULL)."""
    values = {}
    for attribute in entity.attributes:
        raw = row[attribute.name]
        if raw == "" and attribute.nullable:
            values[attribute.name] = to_value(None)
        else:
            values[attribute.name] = to_value(_PARSERS.get(attribute.type, str)(raw))
    return values


def expected_recipients() -> set[str]:
    """The email addresses the demo campaign must reach, computed directly from the dataset."""
    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    return {
        c["email"]
        for c in read_rows("customers")
        if c["loyalty_tier"] in DEMO_TIERS
        and c["country"] != EXCLUDED_COUNTRY
        and c["email"]
        and consent[c["customer_id"]] == "opted_in"
    }


def demo_query() -> query_pb2.AudienceQuery:
    """Gold and platinum customers outside the US."""
    return query_pb2.AudienceQuery(
        dimension="entities/customers",
        filter=query_pb2.Filter(
            all=query_pb2.FilterList(
                filters=[
                    query_pb2.Filter(
                        condition=query_pb2.Condition(
                            attribute="loyalty_tier",
                            operator=query_pb2.OPERATOR_IN,
                            values=[to_value(t) for t in DEMO_TIERS],
                        )
                    ),
                    query_pb2.Filter(
                        condition=query_pb2.Condition(
                            attribute="country",
                            operator=query_pb2.OPERATOR_NOT_EQUAL,
                            values=[to_value(EXCLUDED_COUNTRY)],
                        )
                    ),
                ]
            )
        ),
    )


def demo_campaign() -> campaign_pb2.Campaign:
    """The canvas: build the audience, then email it."""
    return campaign_pb2.Campaign(
        display_name="Loyalty offer: Paris weekend",
        activities=[
            campaign_pb2.Activity(
                id="audience",
                display_name="Gold and platinum outside the US",
                build_audience=campaign_pb2.BuildAudienceActivity(query=demo_query()),
            ),
            campaign_pb2.Activity(
                id="email",
                display_name="Offer email",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=TEMPLATE,
                    batch_size=50,
                    target_attributes=["loyalty_tier", "country"],
                ),
            ),
        ],
        transitions=[campaign_pb2.Transition(source="audience", target="email")],
    )


def demo_template() -> template_pb2.Template:
    """The personalised offer email."""
    return template_pb2.Template(
        channel=channel_pb2.CHANNEL_EMAIL,
        display_name="Paris weekend offer",
        email=template_pb2.EmailContent(
            subject=(
                "{{ profile.first_name | default('Hello') }}, a Paris weekend for {{ target.loyalty_tier }} members"
            ),
            text_body=(
                "Hi {{ profile.first_name | default('there') }},\n\n"
                "As a {{ target.loyalty_tier }} member you get 20% off two nights in Paris.\n\n"
                "-- The Carillon Hotels team\n"
            ),
            html_body=(
                "<p>Hi {{ profile.first_name | default('there') }},</p>"
                "<p>As a <b>{{ target.loyalty_tier }}</b> member you get 20% off two nights in Paris.</p>"
            ),
            sender_name="Carillon Hotels",
        ),
    )


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class DemoResult:
    """What the demo did: the run, its final state and its per-activity tasks."""

    campaign: str
    run: str
    state: str
    targeted_estimate: int
    tasks: list[run_pb2.ActivityTask] = field(default_factory=list)
    error: str = ""


Progress = Callable[[run_pb2.Run], None]


class Demo:
    """The demo's steps, over gRPC channels to the four services."""

    def __init__(self, endpoints: Endpoints, sandbox: str = "demo") -> None:
        self.endpoints = endpoints
        self.metadata = call_metadata(sandbox)
        self._channels = {
            name: open_channel(endpoints.of(name)) for name in ("audience", "scheduler", "delivery", "profile")
        }
        self.audience = aud_grpc.AudienceServiceStub(self._channels["audience"])
        self.campaigns = sch_grpc.CampaignServiceStub(self._channels["scheduler"])
        self.delivery = dlv_grpc.DeliveryServiceStub(self._channels["delivery"])
        self.profiles = prf_grpc.ProfileServiceStub(self._channels["profile"])

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels.values():
            await channel.close()

    async def ensure_entity(self, entity_id: str, entity: entity_pb2.Entity) -> None:
        """Create the entity unless it exists already."""
        try:
            await self.audience.CreateEntity(
                aud.CreateEntityRequest(entity_id=entity_id, entity=entity), metadata=self.metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    async def ingest(self, entity_id: str, entity: entity_pb2.Entity, rows: Iterable[dict[str, str]]) -> int:
        """Stream the rows in batches of 100; return how many were upserted."""
        changes = [aud.RecordChange(values=typed_row(entity, row)) for row in rows]

        async def batches() -> AsyncIterator[aud.IngestRecordsRequest]:
            for chunk in _chunks(changes, 100):
                yield aud.IngestRecordsRequest(entity=f"entities/{entity_id}", changes=chunk)

        reply = await self.audience.IngestRecords(batches(), metadata=self.metadata)
        return int(reply.upserted)

    async def load_profiles(self) -> int:
        """Upsert every profile with its identities and email consent."""
        states = {"opted_in": profile_pb2.CONSENT_STATE_OPTED_IN, "opted_out": profile_pb2.CONSENT_STATE_OPTED_OUT}
        profiles = []
        for row in read_rows("profiles"):
            identities = [value_pb2.Identity(namespace="crm_id", value=row["customer_id"])]
            if row["email"]:
                identities.append(value_pb2.Identity(namespace="email", value=row["email"]))
            consents = []
            if row["email_consent"] in states:
                consents.append(
                    profile_pb2.Consent(
                        channel=channel_pb2.CHANNEL_EMAIL, state=states[row["email_consent"]], source="demo-import"
                    )
                )
            profiles.append(
                profile_pb2.Profile(
                    name=f"profiles/{row['customer_id']}",
                    identities=identities,
                    first_name=row["first_name"],
                    last_name=row["last_name"],
                    consents=consents,
                )
            )
        total = 0
        for chunk in _chunks(profiles, 100):
            reply = await self.profiles.UpsertProfiles(
                prf.UpsertProfilesRequest(profiles=chunk), metadata=self.metadata
            )
            total += reply.created + reply.updated
        return total

    async def ensure_template(self) -> None:
        """Create the offer template unless it exists already."""
        try:
            await self.delivery.CreateTemplate(
                dlv.CreateTemplateRequest(template_id=TEMPLATE.split("/")[1], template=demo_template()),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    async def evaluate(self) -> int:
        """The exact size of the demo audience."""
        reply = await self.audience.EvaluateAudience(
            aud.EvaluateAudienceRequest(query=demo_query(), sample_size=3), metadata=self.metadata
        )
        return int(reply.count)

    async def launch(self) -> tuple[str, str]:
        """Create and publish the campaign; return (campaign name, run name)."""
        created = await self.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign=demo_campaign(), request_id=uuid.uuid4().hex), metadata=self.metadata
        )
        published = await self.campaigns.PublishCampaign(
            sch.PublishCampaignRequest(name=created.campaign.name), metadata=self.metadata
        )
        return created.campaign.name, published.run

    async def follow(self, run: str, on_progress: Progress | None = None, timeout_s: float = 300) -> run_pb2.Run:
        """Poll the run until it ends, reporting progress; return its final state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        finished = (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_FAILED)
        while True:
            reply = await self.campaigns.GetRun(sch.GetRunRequest(name=run), metadata=self.metadata)
            if on_progress is not None:
                on_progress(reply.run)
            if reply.run.state in finished:
                final: run_pb2.Run = reply.run
                return final
            if loop.time() > deadline:
                raise TimeoutError(f"run {run} did not finish within {timeout_s:.0f}s")
            await asyncio.sleep(0.2)

    async def run(self, say: Callable[[str], None] = print, on_progress: Progress | None = None) -> DemoResult:
        """Every step of the demo, in order."""
        customers, bookings = read_rows("customers"), read_rows("bookings")
        await self.ensure_entity("customers", CUSTOMERS)
        await self.ensure_entity("bookings", BOOKINGS)
        say("entities: customers, bookings")
        upserted = await self.ingest("customers", CUSTOMERS, customers)
        say(f"ingested customers: {len(customers)} rows sent, {upserted} new or changed")
        upserted = await self.ingest("bookings", BOOKINGS, bookings)
        say(f"ingested bookings: {len(bookings)} rows sent, {upserted} new or changed")
        say(f"profiles loaded: {await self.load_profiles()}")
        await self.ensure_template()
        say(f"template: {TEMPLATE}")
        estimate = await self.evaluate()
        say(f"audience 'gold and platinum outside the US': {estimate} customers")
        campaign, run = await self.launch()
        say(f"published {campaign}; run {run}")
        final = await self.follow(run, on_progress)
        return DemoResult(
            campaign=campaign,
            run=run,
            state=run_pb2.RunState.Name(final.state),
            targeted_estimate=estimate,
            tasks=list(final.tasks),
            error=final.error,
        )
