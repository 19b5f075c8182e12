"""scheduler_svc's campaign and run stores on both backends: create, idempotency, publish, pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database, utcnow
from carillon_chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    CampaignState,
    Canvas,
    ChannelSend,
    RunKey,
    RunState,
    Schedule,
    TaskState,
    Transition,
)
from scheduler_svc.runs import RunStore
from scheduler_svc.tables import RUNS


def canvas(start: datetime | None = None) -> Canvas:
    """Email listed before the audience it depends on, so execution order differs from canvas order."""
    query = query_pb2.AudienceQuery(dimension="entities/customers")
    return Canvas(
        activities=[
            Activity(
                "email",
                "Offer",
                ChannelSend("email", "marketing", "templates/offer", 50, ["tier"]),
            ),
            Activity("audience", "Gold", BuildAudience(query)),
        ],
        transitions=[Transition("audience", "email")],
        schedule=Schedule(start_time=start, time_zone="Europe/Paris"),
    )


def test_create_stores_a_draft_whose_canvas_reads_back_unchanged(campaigns: CampaignStore) -> None:
    created = campaigns.create("prod", "spring", "Spring sale", canvas())

    read = campaigns.get("prod", "spring")
    assert read.state == CampaignState.DRAFT
    assert (read.name, read.display_name) == ("campaigns/spring", "Spring sale")
    assert read.canvas == canvas()
    assert read.create_time == created.create_time
    assert read.publish_time is None


def test_an_empty_id_gets_a_generated_one(campaigns: CampaignStore) -> None:
    created = campaigns.create("prod", "", "", canvas())

    assert created.campaign_id.startswith("c")
    assert campaigns.get("prod", created.campaign_id).campaign_id == created.campaign_id


def test_a_repeated_request_id_returns_the_first_campaign_and_creates_no_other(campaigns: CampaignStore) -> None:
    first = campaigns.create("prod", "", "Spring", canvas(), request_id="req-1")
    again = campaigns.create("prod", "", "Spring", canvas(), request_id="req-1")

    assert again.campaign_id == first.campaign_id
    listed, _ = campaigns.list_campaigns("prod")
    assert [c.campaign_id for c in listed] == [first.campaign_id]


def test_the_same_request_id_in_another_sandbox_creates_another_campaign(campaigns: CampaignStore) -> None:
    campaigns.create("prod", "spring", "", canvas(), request_id="req-1")
    other = campaigns.create("test", "spring", "", canvas(), request_id="req-1")

    assert other.campaign_id == "spring"
    assert [c.campaign_id for c in campaigns.list_campaigns("test")[0]] == ["spring"]


def test_an_id_taken_by_another_request_is_already_exists(campaigns: CampaignStore) -> None:
    campaigns.create("prod", "spring", "", canvas(), request_id="req-1")

    with pytest.raises(AlreadyExists) as caught:
        campaigns.create("prod", "spring", "", canvas(), request_id="req-2")
    assert [v.field for v in caught.value.violations] == ["campaign_id"]


def test_an_invalid_canvas_writes_nothing(campaigns: CampaignStore) -> None:
    bad = canvas()
    bad.transitions = []

    with pytest.raises(InvalidArgument):
        campaigns.create("prod", "spring", "", bad, request_id="req-1")
    assert campaigns.list_campaigns("prod") == ([], "")


def test_publish_schedules_one_pending_run_with_a_pending_task_per_activity_in_execution_order(
    campaigns: CampaignStore, runs: RunStore
) -> None:
    start = datetime(2031, 5, 4, 9, 0, tzinfo=UTC)
    campaigns.create("prod", "spring", "", canvas(start=start))

    published, key = campaigns.publish("prod", "spring")

    assert published.state == CampaignState.SCHEDULED and published.publish_time is not None
    run = runs.get(key)
    assert run.state == RunState.PENDING
    assert run.scheduled_time == start
    assert [(t.activity, t.state) for t in run.tasks] == [
        ("audience", TaskState.PENDING),
        ("email", TaskState.PENDING),
    ]


def test_publish_without_a_start_time_makes_the_run_due_at_once(campaigns: CampaignStore, runs: RunStore) -> None:
    campaigns.create("prod", "spring", "", canvas())
    before = utcnow()

    _, key = campaigns.publish("prod", "spring")

    assert before <= runs.get(key).scheduled_time <= utcnow()


def test_publishing_a_published_campaign_is_an_illegal_transition(campaigns: CampaignStore, runs: RunStore) -> None:
    campaigns.create("prod", "spring", "", canvas())
    campaigns.publish("prod", "spring")

    with pytest.raises(FailedPrecondition) as caught:
        campaigns.publish("prod", "spring")
    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert caught.value.metadata["state"] == "scheduled"
    assert len(runs.list_runs("prod", "spring")[0]) == 1


def test_publishing_an_unknown_campaign_is_not_found(campaigns: CampaignStore) -> None:
    with pytest.raises(NotFound):
        campaigns.publish("prod", "ghost")


def test_campaigns_are_listed_in_id_order_one_page_at_a_time(campaigns: CampaignStore) -> None:
    for campaign_id in ["c3", "c1", "c5", "c2", "c4"]:
        campaigns.create("prod", campaign_id, "", canvas())

    pages: list[list[str]] = []
    token = ""
    while True:
        page, token = campaigns.list_campaigns("prod", 2, token)
        pages.append([c.campaign_id for c in page])
        if not token:
            break
    assert pages == [["c1", "c2"], ["c3", "c4"], ["c5"]]


def test_a_foreign_page_token_is_invalid_argument_naming_it(campaigns: CampaignStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        campaigns.list_campaigns("prod", 2, "not-a-token")
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_an_unknown_run_is_not_found(runs: RunStore) -> None:
    with pytest.raises(NotFound):
        runs.get(RunKey("prod", "spring", "r1"))


def test_listing_the_runs_of_an_unknown_campaign_is_not_found_naming_the_parent(runs: RunStore) -> None:
    with pytest.raises(NotFound) as caught:
        runs.list_runs("prod", "ghost")
    assert [v.field for v in caught.value.violations] == ["parent"]


def test_runs_are_listed_newest_first_one_page_at_a_time(
    database: Database, campaigns: CampaignStore, runs: RunStore
) -> None:
    campaigns.create("prod", "spring", "", canvas())
    _, published = campaigns.publish("prod", "spring")
    created = runs.get(published).create_time
    # A once-scheduled campaign has one run; older runs (as a recurring schedule will make) are inserted directly.
    with database.engine.begin() as conn:
        for days, run_id in [(3, "r-old"), (2, "r-mid"), (1, "r-new")]:
            conn.execute(
                RUNS.insert().values(
                    sandbox="prod",
                    campaign_id="spring",
                    run_id=run_id,
                    state=RunState.SUCCEEDED.value,
                    scheduled_time=created - timedelta(days=days),
                    create_time=created - timedelta(days=days),
                    error="",
                )
            )

    pages: list[list[str]] = []
    token = ""
    while True:
        page, token = runs.list_runs("prod", "spring", 3, token)
        pages.append([r.key.run_id for r in page])
        if not token:
            break
    assert pages == [[published.run_id, "r-new", "r-mid"], ["r-old"]]
