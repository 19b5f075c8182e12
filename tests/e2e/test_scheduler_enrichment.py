"""The enrich activity on the real stack (four servers, SMTP), on SQLite and PostgreSQL: customers
with a one-to-many link to their bookings are built, enriched with their two most recent bookings (a
collection), their number of bookings (an aggregate) and their tier under an alias, and emailed with a
template that loops over the collection; every body is exact, computed from the bundled dataset. An
enrichment through a link that does not exist fails the enrich activity of a test run, naming the field.
"""

from __future__ import annotations

from collections import defaultdict
from email.message import EmailMessage

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import query_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import template_pb2
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.type.v1 import channel_pb2
from carillon_chassis.values import to_value
from carillon_cli.demo import Demo, read_rows
from tests.e2e.conftest import Stack
from tests.e2e.test_scheduler_flows import prepared, watch_to_end
from tests.e2e.test_scheduler_targeting import link_customers_to_bookings, run_campaign

Act = campaign_pb2.Activity
Tr = campaign_pb2.Transition
TEMPLATE = "templates/recent-stays"
BODY = (
    "Hi {{ profile.first_name }} ({{ target.tier }}), {{ target.stay_count }} stays.\n"
    "{% for b in target.recent %}{{ b.check_in }} {{ b.hotel_city }} {{ b.nights }}\n{% endfor %}"
    "{% if not target.recent %}No stay yet.\n{% endif %}"
)


def chosen_customers() -> list[dict[str, str]]:
    """Two customers with at least three bookings and one with none, all with an email and consent."""
    counts: dict[str, int] = defaultdict(int)
    for booking in read_rows("bookings"):
        counts[booking["customer_id"]] += 1
    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    eligible = [c for c in read_rows("customers") if c["email"] and consent[c["customer_id"]] == "opted_in"]
    busy = [c for c in eligible if counts[c["customer_id"]] >= 3][:2]
    idle = [c for c in eligible if counts[c["customer_id"]] == 0][:1]
    assert (len(busy), len(idle)) == (2, 1)
    return busy + idle


def expected_bodies(customers: list[dict[str, str]]) -> dict[str, str]:
    """The text body each chosen customer gets, by email address."""
    bookings: dict[str, list[dict[str, str]]] = defaultdict(list)
    for booking in read_rows("bookings"):
        bookings[booking["customer_id"]].append(booking)
    bodies: dict[str, str] = {}
    for customer in customers:
        own = sorted(bookings[customer["customer_id"]], key=lambda b: b["booking_id"])
        recent = sorted(own, key=lambda b: b["check_in"], reverse=True)[:2]  # stable: ties stay in key order
        lines = [f"{b['check_in']} {b['hotel_city']} {b['nights']}" for b in recent] or ["No stay yet."]
        header = f"Hi {customer['first_name']} ({customer['loyalty_tier']}), {len(own)} stays."
        bodies[customer["email"]] = "\n".join([header, *lines]) + "\n"
    return bodies


def text_of(message: EmailMessage) -> str:
    """The plain text body of a received message, with its SMTP line endings made plain newlines."""
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content()).replace("\r\n", "\n")


def enrichment_campaign(customer_ids: list[str], link: str = "bookings") -> campaign_pb2.Campaign:
    query = query_pb2.AudienceQuery(
        dimension="entities/customers",
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                attribute="customer_id", operator=query_pb2.OPERATOR_IN, values=[to_value(c) for c in customer_ids]
            )
        ),
    )
    enrich = campaign_pb2.EnrichActivity(
        attributes=[campaign_pb2.EnrichAttribute(alias="tier", path="loyalty_tier")],
        aggregates=[aud.Enrichment(alias="stay_count", link=link, measure=query_pb2.LINK_MEASURE_COUNT)],
        collections=[
            aud.CollectionEnrichment(
                alias="recent",
                link=link,
                limit=2,
                order_by=[aud.SortKey(attribute="check_in", descending=True)],
                attributes=["check_in", "hotel_city", "nights"],
            )
        ],
    )
    return campaign_pb2.Campaign(
        display_name="Recent stays",
        activities=[
            Act(id="customers", build_audience=campaign_pb2.BuildAudienceActivity(query=query)),
            Act(id="enrich", enrich=enrich),
            Act(
                id="email",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=TEMPLATE,
                    batch_size=2,
                ),
            ),
        ],
        transitions=[Tr(source="customers", target="enrich"), Tr(source="enrich", target="email")],
    )


async def prepared_with_template(stack: Stack) -> Demo:
    demo = await prepared(stack)
    await link_customers_to_bookings(demo)
    template = template_pb2.Template(
        channel=channel_pb2.CHANNEL_EMAIL,
        display_name="Recent stays",
        email=template_pb2.EmailContent(subject="Your stays", text_body=BODY, sender_name="Carillon Hotels"),
    )
    await demo.delivery.CreateTemplate(
        dlv.CreateTemplateRequest(template_id=TEMPLATE.split("/")[1], template=template), metadata=demo.metadata
    )
    return demo


async def test_an_email_after_an_enrich_activity_loops_over_each_customers_two_most_recent_bookings(
    stack: Stack,
) -> None:
    customers = chosen_customers()
    demo = await prepared_with_template(stack)
    try:
        final = await run_campaign(demo, enrichment_campaign([c["customer_id"] for c in customers]), "enrich")
    finally:
        await demo.close()

    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    tasks = {t.activity: t for t in final.tasks}
    assert dict(tasks["enrich"].outputs) == {"": 3}
    assert (tasks["email"].targeted, tasks["email"].sent) == (3, 3)
    bodies = {mail.recipients[0]: text_of(mail.message) for mail in stack.smtp.messages}
    assert bodies == expected_bodies(customers)


async def test_an_enrichment_through_an_unknown_link_fails_the_enrich_activity_of_a_test_run(stack: Stack) -> None:
    customers = chosen_customers()
    demo = await prepared_with_template(stack)
    try:
        created = await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(
                campaign=enrichment_campaign([c["customer_id"] for c in customers], link="stays"), request_id="bad"
            ),
            metadata=demo.metadata,
        )
        tested = await demo.campaigns.TestCampaign(
            sch.TestCampaignRequest(name=created.campaign.name, request_id="bad-test"), metadata=demo.metadata
        )
        final = (await watch_to_end(demo, tested.run))[-1]
    finally:
        await demo.close()

    assert final.state == run_pb2.RUN_STATE_FAILED
    tasks = {t.activity: t for t in final.tasks}
    assert tasks["enrich"].state == run_pb2.TASK_STATE_FAILED
    assert tasks["enrich"].message == (
        "audience_svc refused the enrichment of 'enrich' (INVALID_ENRICHMENT): enrich.aggregates[0].link:"
        " unknown link 'stays' of entity 'customers'"
    )
    assert tasks["email"].state == run_pb2.TASK_STATE_SKIPPED
    assert stack.smtp.messages == []
