"""Targeting activities on the real stack (four servers, SMTP), on SQLite and PostgreSQL: a canvas
that combines two audiences (intersection with its complement), splits the result by tier, keeps five
customers per country, saves them as an audience and emails them, and follows the platinum subset to
its bookings (change of dimension); then a second campaign reads the saved audience. Every count is
computed from the bundled dataset; a canvas that combines two dimensions is refused."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import field_mask_pb2

from carillon.audience.v1 import audience_pb2, entity_pb2, query_pb2, working_set_pb2
from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.type.v1 import channel_pb2
from carillon_chassis.values import to_value
from carillon_cli.demo import TEMPLATE, Demo, demo_query, read_rows
from tests.e2e.conftest import Stack
from tests.e2e.test_scheduler_flows import prepared, watch_to_end
from tests.rpc_errors import failure_of

Act = campaign_pb2.Activity
Tr = campaign_pb2.Transition


def equals(attribute: str, value: str) -> query_pb2.Filter:
    return query_pb2.Filter(
        condition=query_pb2.Condition(attribute=attribute, operator=query_pb2.OPERATOR_EQUAL, values=[to_value(value)])
    )


def end(activity_id: str) -> campaign_pb2.Activity:
    return Act(id=activity_id, end=campaign_pb2.EndActivity())


def targeting_campaign() -> campaign_pb2.Campaign:
    french = query_pb2.AudienceQuery(dimension="entities/customers", filter=equals("country", "FR"))
    return campaign_pb2.Campaign(
        display_name="Targeting activities",
        activities=[
            Act(id="tiers", build_audience=campaign_pb2.BuildAudienceActivity(query=demo_query())),
            Act(id="french", build_audience=campaign_pb2.BuildAudienceActivity(query=french)),
            Act(
                id="both",
                combine=campaign_pb2.CombineActivity(
                    operation=aud.COMBINE_OPERATION_INTERSECTION, primary="tiers", complement_output="either"
                ),
            ),
            Act(
                id="split",
                split=campaign_pb2.SplitActivity(
                    subsets=[campaign_pb2.SplitSubsetActivity(output="gold", filter=equals("loyalty_tier", "gold"))],
                    complement_output="platinum",
                ),
            ),
            Act(
                id="five",
                deduplicate=campaign_pb2.DeduplicateActivity(
                    fields=["country"],
                    keep=5,
                    method=aud.DEDUPLICATION_METHOD_LOWEST,
                    attribute="customer_id",
                    removed_output="others",
                ),
            ),
            Act(
                id="save",
                save_audience=campaign_pb2.SaveAudienceActivity(audience_id="gold-fr", display_name="Gold FR"),
            ),
            Act(
                id="email",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=TEMPLATE,
                    batch_size=2,
                    target_attributes=["loyalty_tier"],
                ),
            ),
            Act(
                id="to_bookings",
                change_dimension=campaign_pb2.ChangeDimensionActivity(link="bookings", dimension="entities/bookings"),
            ),
            end("either_end"),
            end("others_end"),
            end("bookings_end"),
        ],
        transitions=[
            Tr(source="tiers", target="both"),
            Tr(source="french", target="both"),
            Tr(source="both", target="split"),
            Tr(source="both", target="either_end", output="either"),
            Tr(source="split", target="five", output="gold"),
            Tr(source="split", target="to_bookings", output="platinum"),
            Tr(source="five", target="save"),
            Tr(source="five", target="others_end", output="others"),
            Tr(source="save", target="email"),
            Tr(source="to_bookings", target="bookings_end"),
        ],
    )


async def link_customers_to_bookings(demo: Demo) -> None:
    link = entity_pb2.Link(
        name="bookings",
        target="entities/bookings",
        cardinality=entity_pb2.LINK_CARDINALITY_ONE_TO_MANY,
        join=[entity_pb2.JoinAttributes(attribute="customer_id", target_attribute="customer_id")],
    )
    await demo.audience.UpdateEntity(
        aud.UpdateEntityRequest(
            entity=entity_pb2.Entity(name="entities/customers", links=[link]),
            update_mask=field_mask_pb2.FieldMask(paths=["links"]),
        ),
        metadata=demo.metadata,
    )


async def run_campaign(demo: Demo, campaign: campaign_pb2.Campaign, request_id: str) -> run_pb2.Run:
    created = await demo.campaigns.CreateCampaign(
        sch.CreateCampaignRequest(campaign=campaign, request_id=request_id), metadata=demo.metadata
    )
    published = await demo.campaigns.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=demo.metadata
    )
    return (await watch_to_end(demo, published.run))[-1]


@dataclass(frozen=True)
class Expected:
    """The populations of every step, from the dataset."""

    tiers: int
    french: int
    both: int
    either: int
    gold: int
    platinum: int
    recipients: list[str]
    bookings: int


def expected() -> Expected:
    customers = read_rows("customers")
    tiers = {c["customer_id"] for c in customers if c["loyalty_tier"] in ("gold", "platinum") and c["country"] != "US"}
    french = {c["customer_id"] for c in customers if c["country"] == "FR"}
    both = tiers & french
    tier_of = {c["customer_id"]: c["loyalty_tier"] for c in customers}
    gold = sorted(c for c in both if tier_of[c] == "gold")
    platinum = {c for c in both if tier_of[c] == "platinum"}
    five = gold[:5]  # one country: the five lowest ids are kept
    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    email_of = {c["customer_id"]: c["email"] for c in customers}
    return Expected(
        tiers=len(tiers),
        french=len(french),
        both=len(both),
        either=len(tiers | french) - len(both),
        gold=len(gold),
        platinum=len(platinum),
        recipients=[email_of[c] for c in five if email_of[c] and consent[c] == "opted_in"],
        bookings=len({b["booking_id"] for b in read_rows("bookings") if b["customer_id"] in platinum}),
    )


async def test_a_canvas_of_targeting_activities_counts_every_output_and_emails_the_final_population(
    stack: Stack,
) -> None:
    demo = await prepared(stack)
    want = expected()
    try:
        await link_customers_to_bookings(demo)
        final = await run_campaign(demo, targeting_campaign(), "targeting")
        saved = await demo.audience.GetAudience(
            aud.GetAudienceRequest(name="audiences/gold-fr"), metadata=demo.metadata
        )
        reader = campaign_pb2.Campaign(
            display_name="Read the saved audience",
            activities=[
                Act(
                    id="read",
                    read_audience=campaign_pb2.ReadAudienceActivity(
                        audience="audiences/gold-fr", dimension="entities/customers"
                    ),
                ),
                end("done"),
            ],
            transitions=[Tr(source="read", target="done")],
        )
        read = await run_campaign(demo, reader, "reader")
    finally:
        await demo.close()

    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    tasks = {t.activity: t for t in final.tasks}
    assert dict(tasks["both"].outputs) == {"": want.both, "either": want.either}
    assert dict(tasks["split"].outputs) == {"gold": want.gold, "platinum": want.platinum}
    assert dict(tasks["five"].outputs) == {"": 5, "others": want.gold - 5}
    assert dict(tasks["to_bookings"].outputs) == {"": want.bookings}
    email = tasks["email"]
    assert (email.targeted, email.sent, dict(email.skipped)) == (5, len(want.recipients), {"MISSING_ADDRESS": 1})
    assert Counter(stack.smtp.recipients()) == Counter(want.recipients)
    assert [(t.source, t.output, t.count) for t in final.transitions] == [
        ("tiers", "", want.tiers),
        ("french", "", want.french),
        ("both", "", want.both),
        ("both", "either", want.either),
        ("split", "gold", want.gold),
        ("split", "platinum", want.platinum),
        ("five", "", 5),
        ("five", "others", want.gold - 5),
        ("save", "", 5),
        ("to_bookings", "", want.bookings),
    ]
    assert (saved.audience.kind, saved.audience.member_count) == (audience_pb2.AUDIENCE_KIND_SNAPSHOT, 5)
    assert read.state == run_pb2.RUN_STATE_SUCCEEDED, read.error
    assert read.tasks[0].targeted == 5


async def test_a_canvas_combining_two_dimensions_is_refused_naming_the_transition(stack: Stack) -> None:
    campaign = targeting_campaign()
    campaign.activities[1].build_audience.query.dimension = "entities/bookings"
    campaign.activities[1].build_audience.query.ClearField("filter")
    demo = Demo(stack.endpoints, sandbox="flows")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await demo.campaigns.CreateCampaign(sch.CreateCampaignRequest(campaign=campaign), metadata=demo.metadata)
    finally:
        await demo.close()

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CANVAS",
        ["campaign.transitions[1].source"],
    )


def reconciling_campaign() -> campaign_pb2.Campaign:
    paris = query_pb2.AudienceQuery(dimension="entities/bookings", filter=equals("hotel_city", "Paris"))
    incremental = working_set_pb2.Incremental(processed_keys=working_set_pb2.IncrementalProcessedKeys())
    pair = working_set_pb2.ReconciliationPair(source_attribute="customer_id", target_attribute="customer_id")
    return campaign_pb2.Campaign(
        display_name="Paris bookers, once",
        activities=[
            Act(id="paris", build_audience=campaign_pb2.BuildAudienceActivity(query=paris, incremental=incremental)),
            Act(
                id="owners",
                reconcile=campaign_pb2.ReconcileActivity(
                    target="entities/customers", pairs=[pair], unreconciled_output="lost"
                ),
            ),
            end("owners_end"),
            end("lost_end"),
        ],
        transitions=[
            Tr(source="paris", target="owners"),
            Tr(source="owners", target="owners_end"),
            Tr(source="owners", target="lost_end", output="lost"),
        ],
    )


async def test_an_incremental_build_then_a_reconciliation_count_exactly_and_a_second_run_finds_nothing_new(
    stack: Stack,
) -> None:
    paris = [b for b in read_rows("bookings") if b["hotel_city"] == "Paris"]
    demo = await prepared(stack)
    try:
        created = await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign=reconciling_campaign(), request_id="reconcile"), metadata=demo.metadata
        )
        runs = []
        for attempt in ("first", "second"):
            tested = await demo.campaigns.TestCampaign(
                sch.TestCampaignRequest(name=created.campaign.name, request_id=attempt), metadata=demo.metadata
            )
            runs.append((await watch_to_end(demo, tested.run))[-1])
    finally:
        await demo.close()

    first, second = runs
    assert first.state == run_pb2.RUN_STATE_SUCCEEDED, first.error
    assert [(t.activity, dict(t.outputs)) for t in first.tasks[:2]] == [
        ("paris", {"": len(paris)}),
        ("owners", {"": len({b["customer_id"] for b in paris}), "lost": 0}),
    ]
    assert second.state == run_pb2.RUN_STATE_SUCCEEDED, second.error
    assert [(t.activity, dict(t.outputs)) for t in second.tasks[:2]] == [
        ("paris", {"": 0}),
        ("owners", {"": 0, "lost": 0}),
    ]
