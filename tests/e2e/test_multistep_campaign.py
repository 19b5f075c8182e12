"""A multi-step campaign end to end, on SQLite and PostgreSQL: build → split → email; wait → SMS to
those who did not open the email.

The real four services run with two delivery workers — email over SMTP to an aiosmtpd server, and SMS
through the Twilio-style adapter to a local HTTP server that records every request — and delivery
forwards its sends and feedback to audience_svc as message logs. After the email step, opens are
reported through delivery's ``RecordFeedback`` for a chosen subset of the sent messages (their
``X-Carillon-Message-Id``); when the wait is over, the campaign builds the customers with an ``opened``
message log of its email activity (the built-in ``message_logs`` link), excludes them from the email's
population and texts the rest. Every count is exact.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from audience_svc.app import build_server as build_audience
from audience_svc.settings import AudienceSettings
from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import query_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import template_pb2
from carillon.profile.v1 import profile_pb2
from carillon.profile.v1 import profile_service_pb2 as prf
from carillon.scheduler.v1 import campaign_pb2, run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.server import GrpcServer
from carillon_chassis.values import to_value
from carillon_cli.demo import BOOKINGS, CUSTOMERS, TEMPLATE, Demo, demo_query, read_rows
from carillon_cli.endpoints import Endpoints
from delivery_svc.app import build_server as build_delivery
from delivery_svc.settings import DeliverySettings
from profile_stub.app import build_server as build_profile
from profile_stub.settings import ProfileSettings
from scheduler_svc.app import build_server as build_scheduler
from scheduler_svc.settings import SchedulerSettings
from tests.conftest import DatabaseFactory
from tests.e2e.conftest import RecordingHandler
from tests.e2e.test_scheduler_flows import watch_to_end

CAMPAIGN = "multistep"
SMS_TEMPLATE = "templates/offer-reminder"
WAIT_S = 15  # time for the test to report the opens after the email step (opens after it are not seen)
Act = campaign_pb2.Activity
Tr = campaign_pb2.Transition


@dataclass
class SmsApi:
    """A local Twilio-style API recording the form of every message posted to it."""

    port: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def sms_api() -> Iterator[SmsApi]:
    api = SmsApi()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            api.messages.append(dict(urllib.parse.parse_qsl(body)))
            payload = b'{"sid": "SM1", "status": "queued"}'
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield api
    server.shutdown()
    server.server_close()


@dataclass
class MultiStack:
    """The running services (two delivery workers) and what the SMTP server and SMS API received."""

    endpoints: Endpoints
    smtp: RecordingHandler
    sms: SmsApi


@pytest.fixture
async def multistack(
    database_factory: DatabaseFactory, smtp_server: tuple[RecordingHandler, int], sms_api: SmsApi
) -> AsyncIterator[MultiStack]:
    """The four services with an email and an SMS delivery worker (sharing delivery's database)."""
    handler, smtp_port = smtp_server
    servers: dict[str, GrpcServer] = {}

    def db(service: str) -> dict[str, Any]:
        url, schema = database_factory.url_and_schema(service)
        return {"database_url": url, "database_schema": schema, "port": 0, "grace_period_s": 1.0}

    try:
        servers["audience"] = await build_audience(AudienceSettings(**db("audience")))
        await servers["audience"].start()
        servers["profile"] = await build_profile(ProfileSettings(**db("profile")))
        await servers["profile"].start()
        common = {
            **db("delivery"),  # one delivery database, shared by both workers
            "profile_target": servers["profile"].address,
            "audience_target": servers["audience"].address,
            "message_log_interval_s": 0.1,
        }
        servers["delivery"] = await build_delivery(
            DeliverySettings(**common, email_provider="smtp", smtp_host="127.0.0.1", smtp_port=smtp_port)
        )
        await servers["delivery"].start()
        servers["sms"] = await build_delivery(
            DeliverySettings(
                **common,
                channel="sms",
                sms_api_url=f"http://127.0.0.1:{sms_api.port}",
                sms_account="AC1",
                sms_token="secret",
                sms_sender="Carillon",
            )
        )
        await servers["sms"].start()
        servers["scheduler"] = await build_scheduler(
            SchedulerSettings(
                **db("scheduler"),
                audience_target=servers["audience"].address,
                delivery_targets={"email": servers["delivery"].address, "sms": servers["sms"].address},
                poll_interval_s=0.05,
            )
        )
        await servers["scheduler"].start()
        endpoints = Endpoints(
            **{name: servers[name].address for name in ("audience", "scheduler", "delivery", "profile")}
        )
        yield MultiStack(endpoints, handler, sms_api)
    finally:
        for name in ("scheduler", "sms", "delivery", "audience", "profile"):
            if name in servers:
                await servers[name].stop(0)


def phone_of(customer_id: str) -> str:
    return f"+4670{int(customer_id[1:]):07d}"


async def load_profiles_with_phones(demo: Demo) -> None:
    """Every demo profile, with a phone number and SMS consent besides its email consent."""
    states = {"opted_in": profile_pb2.CONSENT_STATE_OPTED_IN, "opted_out": profile_pb2.CONSENT_STATE_OPTED_OUT}
    profiles = []
    for row in read_rows("profiles"):
        identities = [
            value_pb2.Identity(namespace="crm_id", value=row["customer_id"]),
            value_pb2.Identity(namespace="phone", value=phone_of(row["customer_id"])),
        ]
        if row["email"]:
            identities.append(value_pb2.Identity(namespace="email", value=row["email"]))
        consents = [
            profile_pb2.Consent(
                channel=channel_pb2.CHANNEL_SMS, state=profile_pb2.CONSENT_STATE_OPTED_IN, source="test-import"
            )
        ]
        if row["email_consent"] in states:
            consents.append(
                profile_pb2.Consent(
                    channel=channel_pb2.CHANNEL_EMAIL, state=states[row["email_consent"]], source="test-import"
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
    for start in range(0, len(profiles), 100):
        await demo.profiles.UpsertProfiles(
            prf.UpsertProfilesRequest(profiles=profiles[start : start + 100]), metadata=demo.metadata
        )


def equals(attribute: str, value: str) -> query_pb2.Filter:
    return query_pb2.Filter(
        condition=query_pb2.Condition(attribute=attribute, operator=query_pb2.OPERATOR_EQUAL, values=[to_value(value)])
    )


def openers_query() -> query_pb2.AudienceQuery:
    """Customers with an ``opened`` message log of this campaign's email activity."""
    logs = query_pb2.Filter(
        all=query_pb2.FilterList(
            filters=[
                equals("status", "opened"),
                equals("campaign", f"campaigns/{CAMPAIGN}"),
                equals("activity", "email"),
            ]
        )
    )
    return query_pb2.AudienceQuery(
        dimension="entities/customers",
        filter=query_pb2.Filter(
            link=query_pb2.LinkCondition(link="message_logs", measure=query_pb2.LINK_MEASURE_EXISTS, filter=logs)
        ),
    )


def multistep_campaign() -> campaign_pb2.Campaign:
    pause = Act(id="pause", wait=campaign_pb2.WaitActivity())
    pause.wait.duration.FromSeconds(WAIT_S)
    return campaign_pb2.Campaign(
        display_name="Paris offer: email, then a text to those who did not open it",
        activities=[
            Act(id="audience", build_audience=campaign_pb2.BuildAudienceActivity(query=demo_query())),
            Act(
                id="split",
                split=campaign_pb2.SplitActivity(
                    subsets=[campaign_pb2.SplitSubsetActivity(output="gold", filter=equals("loyalty_tier", "gold"))],
                    complement_output="others",
                ),
            ),
            Act(
                id="email",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=TEMPLATE,
                    batch_size=20,
                    target_attributes=["loyalty_tier"],
                ),
            ),
            pause,
            Act(id="openers", build_audience=campaign_pb2.BuildAudienceActivity(query=openers_query())),
            Act(
                id="unopened",
                combine=campaign_pb2.CombineActivity(operation=aud.COMBINE_OPERATION_EXCLUSION, primary="pause"),
            ),
            Act(
                id="text",
                channel=campaign_pb2.ChannelActivity(
                    channel=channel_pb2.CHANNEL_SMS,
                    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
                    template=SMS_TEMPLATE,
                    batch_size=20,
                ),
            ),
            Act(id="others_end", end=campaign_pb2.EndActivity()),
        ],
        transitions=[
            Tr(source="audience", target="split"),
            Tr(source="split", target="email", output="gold"),
            Tr(source="split", target="others_end", output="others"),
            Tr(source="email", target="pause"),
            Tr(source="pause", target="openers"),
            Tr(source="pause", target="unopened"),
            Tr(source="openers", target="unopened"),
            Tr(source="unopened", target="text"),
        ],
    )


async def prepare(demo: Demo) -> None:
    await demo.ensure_entity("customers", CUSTOMERS)
    await demo.ensure_entity("bookings", BOOKINGS)
    await demo.ingest("customers", CUSTOMERS, read_rows("customers"))
    await demo.ingest("bookings", BOOKINGS, read_rows("bookings"))
    await load_profiles_with_phones(demo)
    await demo.ensure_template()
    await demo.delivery.CreateTemplate(
        dlv.CreateTemplateRequest(
            template_id=SMS_TEMPLATE.split("/")[1],
            template=template_pb2.Template(
                channel=channel_pb2.CHANNEL_SMS,
                display_name="Offer reminder",
                sms=template_pb2.SmsContent(
                    text="{{ profile.first_name | default('Hi') }}, your Paris offer ends soon"
                ),
            ),
        ),
        metadata=demo.metadata,
    )


async def opens_reach_audience_before_the_wait_ends(demo: Demo, run: str, opened: int) -> None:
    """Until audience_svc counts ``opened`` opened message logs of the email activity (delivery flushes
    them in the background); fails clearly if the wait ended first, since the campaign would then have
    built its openers without them."""
    query = openers_query()
    query.ClearField("filter")
    query.dimension = "entities/message_logs"
    query.filter.CopyFrom(openers_query().filter.link.filter)
    async with asyncio.timeout(120):  # a guard against a hang, not a speed requirement
        while True:
            reply = await demo.audience.EvaluateAudience(
                aud.EvaluateAudienceRequest(query=query), metadata=demo.metadata
            )
            if reply.count == opened:
                break
            assert reply.count < opened
            await asyncio.sleep(0.05)
    got = await demo.campaigns.GetRun(sch.GetRunRequest(name=run), metadata=demo.metadata)
    openers = next(t for t in got.run.tasks if t.activity == "openers")
    assert openers.state == run_pb2.TASK_STATE_PENDING, (
        f"the opens reached audience_svc only after the {WAIT_S} s wait had ended; the machine is too slow "
        "for this test's wait"
    )


async def email_done(demo: Demo, run: str) -> None:
    """Until the run's email activity has finished."""
    async with asyncio.timeout(120):  # a guard against a hang, not a speed requirement
        while True:
            got = await demo.campaigns.GetRun(sch.GetRunRequest(name=run), metadata=demo.metadata)
            email = next(t for t in got.run.tasks if t.activity == "email")
            if email.state == run_pb2.TASK_STATE_SUCCEEDED:
                return
            assert got.run.state not in (run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_SUCCEEDED), got.run.error
            await asyncio.sleep(0.05)


async def test_an_email_then_after_a_wait_a_text_to_those_who_did_not_open_it(multistack: MultiStack) -> None:
    customers = read_rows("customers")
    consent = {p["customer_id"]: p["email_consent"] for p in read_rows("profiles")}
    gold = {c["customer_id"] for c in customers if c["loyalty_tier"] == "gold" and c["country"] != "US"}
    by_email = {c["email"]: c["customer_id"] for c in customers if c["email"]}
    emailed = sorted(
        by_email[c["email"]]
        for c in customers
        if c["customer_id"] in gold and c["email"] and consent[c["customer_id"]] == "opted_in"
    )
    demo = Demo(multistack.endpoints, sandbox="multistep")
    try:
        await prepare(demo)
        await demo.campaigns.CreateCampaign(
            sch.CreateCampaignRequest(campaign_id=CAMPAIGN, campaign=multistep_campaign()), metadata=demo.metadata
        )
        published = await demo.campaigns.PublishCampaign(
            sch.PublishCampaignRequest(name=f"campaigns/{CAMPAIGN}"), metadata=demo.metadata
        )
        await email_done(demo, published.run)
        mails = sorted(multistack.smtp.messages, key=lambda m: m.recipients[0])
        opened = mails[::3]  # every third recipient opens the email
        await demo.delivery.RecordFeedback(
            dlv.RecordFeedbackRequest(
                events=[
                    dlv.FeedbackEvent(
                        event_id=f"open-{i}",
                        message_id=str(mail.message["X-Carillon-Message-Id"]),
                        kind=dlv.FEEDBACK_KIND_OPENED,
                    )
                    for i, mail in enumerate(opened)
                ]
            ),
            metadata=demo.metadata,
        )
        await opens_reach_audience_before_the_wait_ends(demo, published.run, len(opened))
        final = (await watch_to_end(demo, published.run))[-1]
    finally:
        await demo.close()

    openers = {by_email[mail.recipients[0]] for mail in opened}
    unopened = gold - openers
    assert len(openers) >= 3 and len(unopened) >= 3
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    tasks = {t.activity: t for t in final.tasks}
    assert sorted(by_email[m.recipients[0]] for m in multistack.smtp.messages) == emailed
    assert (tasks["email"].targeted, tasks["email"].sent) == (len(gold), len(emailed))
    assert (tasks["openers"].targeted, tasks["unopened"].targeted) == (len(openers), len(unopened))
    assert (tasks["text"].targeted, tasks["text"].sent, dict(tasks["text"].skipped)) == (
        len(unopened),
        len(unopened),
        {},
    )
    assert Counter(m["To"] for m in multistack.sms.messages) == Counter(phone_of(c) for c in unopened)
    assert [(t.source, t.target, t.output, t.count) for t in final.transitions] == [
        ("audience", "split", "", len(gold) + tasks["split"].outputs["others"]),
        ("split", "email", "gold", len(gold)),
        ("split", "others_end", "others", tasks["split"].outputs["others"]),
        ("email", "pause", "", len(gold)),
        ("pause", "openers", "", len(gold)),
        ("pause", "unopened", "", len(gold)),
        ("openers", "unopened", "", len(openers)),
        ("unopened", "text", "", len(unopened)),
    ]
