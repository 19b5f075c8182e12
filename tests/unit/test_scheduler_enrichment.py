"""The enrich activity on the canvas, against fakes: it passes its population on after a one-row check,
the channel activities downstream request every enrichment on their input path (up to the last
change of dimension) and send its values by alias, audience_svc's refusal fails the activity naming
the fields; the canvas rules (aliases unique along a path) and the stored and API forms."""

from __future__ import annotations

import pytest

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import query_pb2
from carillon.scheduler.v1 import campaign_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import FieldViolation, InvalidArgument
from carillon_chassis.values import to_value
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.gateways import StreamEnrichment
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    Campaign,
    CampaignState,
    Canvas,
    ChangeDimension,
    ChannelSend,
    End,
    Enrich,
    Reconcile,
    RunState,
    RunTrigger,
    Task,
    TaskState,
    Transition,
    Wait,
    canvas_from_json,
    canvas_to_json,
    enrichment_chain,
)
from scheduler_svc.servicer import campaign_to_proto, canvas_from_proto
from scheduler_svc.validation import Limits, validate_campaign
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery, FakeJournal, claimed

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=1, retry_initial_s=0)
CUSTOMERS = "entities/customers"
BOOKINGS = "entities/bookings"


def build(activity_id: str, dimension: str = CUSTOMERS) -> Activity:
    return Activity(activity_id, kind=BuildAudience(query_pb2.AudienceQuery(dimension=dimension)))


def send(activity_id: str, attributes: list[str] | None = None) -> Activity:
    return Activity(activity_id, kind=ChannelSend("email", "marketing", "templates/offer", 3, attributes or []))


def count_of(alias: str, link: str = "bookings") -> aud.Enrichment:
    return aud.Enrichment(alias=alias, link=link, measure=query_pb2.LINK_MEASURE_COUNT)


def latest(alias: str, limit: int = 2) -> aud.CollectionEnrichment:
    return aud.CollectionEnrichment(
        alias=alias,
        link="bookings",
        limit=limit,
        order_by=[aud.SortKey(attribute="check_in", descending=True)],
        attributes=["hotel", "check_in"],
    )


def hotel_enrich() -> Enrich:
    return Enrich(attributes=[("city", "home.city")], collections=[latest("recent")])


def count_enrich() -> Enrich:
    return Enrich(aggregates=[count_of("stays")])


def two_enrichments() -> Canvas:
    """build -> enrich (city, recent) -> wait -> enrich (stays) -> email."""
    canvas = Canvas(
        activities=[
            build("customers"),
            Activity("hotels", kind=hotel_enrich()),
            Activity("pause", kind=Wait(duration_s=0, until=utcnow())),
            Activity("counts", kind=count_enrich()),
            send("mail", ["tier"]),
        ],
        transitions=[
            Transition("customers", "hotels"),
            Transition("hotels", "pause"),
            Transition("pause", "counts"),
            Transition("counts", "mail"),
        ],
    )
    validate_campaign("", canvas, Limits())
    return canvas


def violations(canvas: Canvas) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())
    return [v.field for v in caught.value.violations]


async def execute(
    canvas: Canvas, audience: FakeAudience, delivery: FakeDelivery, *, test_mode: bool = False
) -> FakeJournal:
    run = claimed(canvas)
    if test_mode:
        run.run.trigger = RunTrigger.TEST
    journal = FakeJournal.of(run)
    await Engine(audience, {"email": delivery}, journal, FAST).execute(run)
    return journal


# -- running ---------------------------------------------------------------------------------------
async def test_a_channel_requests_every_enrichment_on_its_path_and_sends_the_values_by_alias() -> None:
    audience, delivery = FakeAudience(size=2), FakeDelivery()

    journal = await execute(two_enrichments(), audience, delivery)

    assert journal.run.state == RunState.SUCCEEDED
    sends = [s for s in audience.streams if s.batch_size == 3]
    assert len(sends) == 1
    assert sends[0].attributes == ["tier"]
    assert sends[0].enrichment == StreamEnrichment(
        paths=(("city", "home.city"),),
        aggregates=(count_of("stays"),),
        collections=(latest("recent"),),
        reference_time=journal.run.scheduled_time,
    )
    assert delivery.targets == {
        key: {
            "tier": to_value("gold"),
            "city": to_value(f"city:{key}"),
            "stays": to_value(f"stays:{key}"),
            "recent": to_value(f"recent:{key}"),
        }
        for key in ("k1", "k2")
    }


async def test_an_enrich_activity_passes_its_population_on_after_a_one_row_check_of_its_own_enrichments() -> None:
    audience, delivery = FakeAudience(size=5), FakeDelivery()

    journal = await execute(two_enrichments(), audience, delivery)

    checks = [(s.working_set, s.after_position, s.batch_size, s.attributes, s.enrichment) for s in audience.streams]
    assert checks[:2] == [
        (
            "workingSets/customers",
            0,
            1,
            [],
            StreamEnrichment(
                paths=(("city", "home.city"),),
                collections=(latest("recent"),),
                reference_time=journal.run.scheduled_time,
            ),
        ),
        (
            "workingSets/customers",
            0,
            1,
            [],
            StreamEnrichment(aggregates=(count_of("stays"),), reference_time=journal.run.scheduled_time),
        ),
    ]
    assert (journal.task("hotels").outputs, journal.task("counts").outputs) == ({"": 5}, {"": 5})
    assert journal.notes["hotels"] == "passes on 5 records, enriched with city, recent"
    assert delivery.delivered == ["k1", "k2", "k3", "k4", "k5"]


async def test_an_enrichment_audience_refuses_fails_the_enrich_activity_naming_its_fields() -> None:
    refusal = InvalidArgument(
        "INVALID_ARGUMENT: unknown attributes",
        reason="UNKNOWN_ATTRIBUTE",
        violations=[FieldViolation("attributes[0]", "in 'home.city', 'home' is not a link of entity 'customers'")],
    )
    audience, delivery = FakeAudience(size=2, enrichment_error=refusal), FakeDelivery()

    journal = await execute(two_enrichments(), audience, delivery)

    assert journal.run.state == RunState.FAILED
    assert journal.task("hotels").state == TaskState.FAILED
    assert journal.task("hotels").message == (
        "audience_svc refused the enrichment of 'hotels' (UNKNOWN_ATTRIBUTE): enrich.attributes[0].path:"
        " in 'home.city', 'home' is not a link of entity 'customers'"
    )
    assert delivery.delivered == []


async def test_in_test_mode_the_enrichments_are_checked_and_nothing_is_sent() -> None:
    audience, delivery = FakeAudience(size=4), FakeDelivery()

    journal = await execute(two_enrichments(), audience, delivery, test_mode=True)

    assert journal.run.state == RunState.SUCCEEDED
    assert [(s.batch_size, s.enrichment is not None) for s in audience.streams] == [(1, True), (1, True)]
    assert journal.notes["mail"] == "test mode: would send to 4 recipients; nothing was sent"
    assert delivery.delivered == []


async def test_a_resumed_channel_requests_the_enrichments_again_from_its_checkpoint() -> None:
    canvas = two_enrichments()
    tasks = [
        Task("customers", TaskState.SUCCEEDED, targeted=6, working_set="workingSets/customers", outputs={"": 6}),
        Task("hotels", TaskState.SUCCEEDED, targeted=6, outputs={"": 6}),
        Task("pause", TaskState.SUCCEEDED, targeted=6, outputs={"": 6}),
        Task("counts", TaskState.SUCCEEDED, targeted=6, outputs={"": 6}),
        Task("mail", TaskState.RUNNING, targeted=6, checkpoint=3),
    ]
    run = claimed(canvas, tasks=tasks)
    audience, delivery = FakeAudience(size=6), FakeDelivery()

    await Engine(audience, {"email": delivery}, FakeJournal.of(run), FAST).execute(run)

    assert [(s.after_position, s.enrichment is not None) for s in audience.streams] == [(3, True)]
    assert sorted(delivery.targets) == ["k4", "k5", "k6"]
    assert delivery.targets["k4"]["stays"] == to_value("stays:k4")


async def test_a_channel_stream_audience_refuses_fails_the_channel_with_the_reason_and_fields() -> None:
    canvas = two_enrichments()
    tasks = [
        Task("customers", TaskState.SUCCEEDED, targeted=2, working_set="workingSets/customers", outputs={"": 2}),
        Task("hotels", TaskState.SUCCEEDED, targeted=2, outputs={"": 2}),
        Task("pause", TaskState.SUCCEEDED, targeted=2, outputs={"": 2}),
        Task("counts", TaskState.SUCCEEDED, targeted=2, outputs={"": 2}),
        Task("mail"),
    ]
    run = claimed(canvas, tasks=tasks)
    refusal = InvalidArgument(
        "INVALID_ARGUMENT: unknown attribute",
        reason="INVALID_ENRICHMENT",
        violations=[FieldViolation("collections[0].attributes[0]", "unknown attribute 'hotel' of entity 'bookings'")],
    )
    audience, delivery = FakeAudience(size=2, enrichment_error=refusal), FakeDelivery()
    journal = FakeJournal.of(run)

    await Engine(audience, {"email": delivery}, journal, FAST).execute(run)

    assert journal.run.state == RunState.FAILED
    assert journal.task("mail").message == (
        "audience_svc refused the enrichment of 'mail' (INVALID_ENRICHMENT): collections[0].attributes[0]:"
        " unknown attribute 'hotel' of entity 'bookings'"
    )
    assert delivery.delivered == []


# -- the input path ----------------------------------------------------------------------------------
def test_enrichments_before_a_change_of_dimension_do_not_reach_the_channels_after_it() -> None:
    canvas = Canvas(
        activities=[
            build("customers"),
            Activity("hotels", kind=hotel_enrich()),
            Activity("to_bookings", kind=ChangeDimension("bookings", BOOKINGS)),
            Activity("counts", kind=Enrich(aggregates=[count_of("nights", "nights")])),
            send("mail"),
        ],
        transitions=[
            Transition("customers", "hotels"),
            Transition("hotels", "to_bookings"),
            Transition("to_bookings", "counts"),
            Transition("counts", "mail"),
        ],
    )
    validate_campaign("", canvas, Limits())

    assert [activity for activity, _ in enrichment_chain(canvas, "mail")] == ["counts"]


def test_enrichments_go_on_through_a_reconciliations_unreconciled_output_but_not_its_main_output() -> None:
    canvas = Canvas(
        activities=[
            build("bookings", BOOKINGS),
            Activity("nights", kind=Enrich(aggregates=[count_of("nights", "nights")])),
            Activity("owners", kind=Reconcile(CUSTOMERS, [("customer_id", "id")], "lost")),
            send("owners_mail"),
            send("lost_mail"),
        ],
        transitions=[
            Transition("bookings", "nights"),
            Transition("nights", "owners"),
            Transition("owners", "owners_mail"),
            Transition("owners", "lost_mail", "lost"),
        ],
    )
    validate_campaign("", canvas, Limits())

    assert enrichment_chain(canvas, "owners_mail") == []
    assert [activity for activity, _ in enrichment_chain(canvas, "lost_mail")] == ["nights"]


# -- canvas rules ------------------------------------------------------------------------------------
def test_an_alias_already_defined_upstream_is_refused_at_the_downstream_field() -> None:
    canvas = two_enrichments()
    canvas.activities[3] = Activity("counts", kind=Enrich(aggregates=[count_of("stays"), count_of("recent")]))

    assert violations(canvas) == ["campaign.activities[3].enrich.aggregates[1].alias"]


def test_an_alias_equal_to_a_channels_target_attribute_is_refused_at_the_target_attribute() -> None:
    canvas = two_enrichments()
    canvas.activities[4] = send("mail", ["tier", "stays"])

    assert violations(canvas) == ["campaign.activities[4].channel.target_attributes[1]"]


def test_an_enrich_activity_names_its_bad_fields() -> None:
    bad = Enrich(
        attributes=[("city", "home.City"), ("city", "tier")],
        aggregates=[
            aud.Enrichment(alias="total", link="bookings", measure=query_pb2.LINK_MEASURE_SUM),
            aud.Enrichment(alias="n", link="bookings"),
        ],
        collections=[aud.CollectionEnrichment(alias="Recent", link="bookings", limit=0)],
    )
    canvas = Canvas(
        activities=[build("customers"), Activity("rich", kind=bad), Activity("empty", kind=Enrich()), send("mail")],
        transitions=[Transition("customers", "rich"), Transition("rich", "empty"), Transition("empty", "mail")],
    )

    assert violations(canvas) == [
        "campaign.activities[1].enrich.attributes[0].path",
        "campaign.activities[1].enrich.attributes[1].alias",
        "campaign.activities[1].enrich.aggregates[0].attribute",
        "campaign.activities[1].enrich.aggregates[1].measure",
        "campaign.activities[1].enrich.collections[0].alias",
        "campaign.activities[1].enrich.collections[0].limit",
        "campaign.activities[2].enrich",
    ]


def test_an_enrich_activity_needs_a_population_upstream() -> None:
    canvas = Canvas(
        activities=[Activity("rich", kind=count_enrich()), Activity("e", kind=End())],
        transitions=[Transition("rich", "e")],
    )

    assert violations(canvas) == ["campaign.activities[0]"]


# -- stored and API forms ----------------------------------------------------------------------------
def test_an_enrich_activity_survives_the_stored_form_and_the_api_form() -> None:
    canvas = two_enrichments()
    now = utcnow()
    campaign = Campaign("spring", "Spring", CampaignState.DRAFT, canvas, now, now)

    message = campaign_to_proto(campaign)

    assert message.activities[1].enrich == campaign_pb2.EnrichActivity(
        attributes=[campaign_pb2.EnrichAttribute(alias="city", path="home.city")], collections=[latest("recent")]
    )
    assert canvas_from_proto(message).activities == canvas.activities
    assert canvas_from_json(canvas_to_json(canvas)).activities == canvas.activities


def test_a_stream_enrichment_requests_each_path_once_and_renames_it_to_its_alias() -> None:
    enrichment = StreamEnrichment(paths=(("city", "home.city"), ("town", "home.city"), ("level", "tier")))
    values = {"tier": to_value("gold"), "home.city": to_value("Lyon")}

    assert enrichment.request_attributes(["tier"]) == ["tier", "home.city"]
    assert enrichment.rename(values, ["tier"]) == {
        "tier": to_value("gold"),
        "city": to_value("Lyon"),
        "town": to_value("Lyon"),
        "level": to_value("gold"),
    }
    assert enrichment.rename(values, []) == {
        "city": to_value("Lyon"),
        "town": to_value("Lyon"),
        "level": to_value("gold"),
    }
