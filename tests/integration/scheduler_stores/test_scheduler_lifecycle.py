"""Campaign lifecycle on both backends: update of drafts only, stop, close, archive, revert to draft
while nothing was sent, delete of drafts, duplicate, signals (idempotent, rate limited), and every
illegal transition refused with FAILED_PRECONDITION and its reason."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from carillon_chassis.values import to_value
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import (
    Ack,
    Activity,
    BuildAudience,
    CampaignState,
    Canvas,
    ChannelSend,
    Daily,
    End,
    LeaseLost,
    LocalTime,
    RunKey,
    RunState,
    RunTrigger,
    Schedule,
    TaskState,
    Transition,
)
from scheduler_svc.runner import StoreJournal
from scheduler_svc.runs import Lease, RunStore
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery

A = Lease("replica-a", 60)
LATER = datetime(2099, 1, 1, tzinfo=UTC)


@pytest.fixture
def lifecycle(campaigns: CampaignStore) -> Lifecycle:
    return Lifecycle(campaigns)


def canvas(schedule: Schedule | None = None, template: str = "templates/offer") -> Canvas:
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", template, 3, [])),
        ],
        transitions=[Transition("audience", "email")],
        schedule=schedule or Schedule(),
    )


def published(campaigns: CampaignStore, campaign_id: str = "spring", schedule: Schedule | None = None) -> RunKey:
    campaigns.create("prod", campaign_id, "Spring", canvas(schedule))
    key = campaigns.publish("prod", campaign_id)[1]
    assert key is not None
    return key


def state_of(campaigns: CampaignStore, campaign_id: str = "spring") -> CampaignState:
    return campaigns.get("prod", campaign_id).state


SIGNAL = Schedule(signal=True)


# -- update ---------------------------------------------------------------------------------------
def test_update_changes_only_the_fields_in_the_mask(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())

    updated = lifecycle.update("prod", "spring", "Autumn", canvas(template="templates/other"), ["display_name"])

    assert updated.display_name == "Autumn"
    assert updated.canvas == canvas()
    again = lifecycle.update("prod", "spring", "ignored", canvas(template="templates/other"), ["activities"])
    assert (again.display_name, again.canvas) == ("Autumn", canvas(template="templates/other"))


def test_an_unknown_update_path_is_invalid_argument_naming_it(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())

    with pytest.raises(InvalidArgument) as caught:
        lifecycle.update("prod", "spring", "", canvas(), ["display_name", "state"])

    assert [v.field for v in caught.value.violations] == ["update_mask.paths[1]"]


def test_an_update_to_an_invalid_canvas_writes_nothing(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())

    with pytest.raises(InvalidArgument) as caught:
        lifecycle.update("prod", "spring", "New name", canvas(template="offer"), [])

    assert caught.value.reason == "INVALID_CANVAS"
    assert campaigns.get("prod", "spring").display_name == "Spring"


def test_a_published_campaign_is_read_only(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    published(campaigns)

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.update("prod", "spring", "New name", canvas(), ["display_name"])

    assert (caught.value.reason, caught.value.metadata["state"]) == ("CAMPAIGN_READ_ONLY", "scheduled")
    assert campaigns.get("prod", "spring").display_name == "Spring"


# -- illegal transitions --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "transition"),
    [
        ("draft", "stop"),
        ("draft", "close"),
        ("draft", "revert_to_draft"),
        ("scheduled", "archive"),
        ("scheduled", "delete"),
        ("stopped", "close"),
        ("archived", "revert_to_draft"),
        ("archived", "stop"),
        ("completed", "close"),
    ],
)
def test_an_illegal_transition_is_failed_precondition_and_changes_nothing(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle, setup: str, transition: str
) -> None:
    campaigns.create("prod", "spring", "Spring", canvas(Schedule(start_time=LATER)))
    if setup != "draft":
        campaigns.publish("prod", "spring")
    if setup in ("stopped", "archived"):
        lifecycle.stop("prod", "spring")
    if setup == "archived":
        lifecycle.archive("prod", "spring")
    if setup == "completed":
        lifecycle.close("prod", "spring")  # nothing running: completes at once
    before = campaigns.get("prod", "spring")

    with pytest.raises(FailedPrecondition) as caught:
        getattr(lifecycle, transition)("prod", "spring")

    assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert caught.value.metadata["state"] == before.state.value
    assert campaigns.get("prod", "spring") == before


def test_a_transition_of_an_unknown_campaign_is_not_found(lifecycle: Lifecycle) -> None:
    with pytest.raises(NotFound):
        lifecycle.stop("prod", "ghost")


# -- stop, close, archive -------------------------------------------------------------------------
def test_stop_cancels_a_pending_run_and_interrupts_a_running_one(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    running = published(campaigns, "running")
    (claimed,) = runs.claim_due_runs(A, limit=1)
    assert claimed.run.key == running
    runs.start_task(running, A, "audience")

    stopped = lifecycle.stop("prod", "running")

    assert stopped.state == CampaignState.STOPPED
    run = runs.get(running)
    assert run.state == RunState.CANCELLED and run.lease_owner is None
    assert [t.state for t in run.tasks] == [TaskState.SKIPPED, TaskState.SKIPPED]
    assert runs.list_logs(running)[0][-1].message == "run cancelled: the campaign was stopped"
    with pytest.raises(LeaseLost):  # the replica executing it stops at its next write
        runs.finish_task(running, A, "audience")
    assert runs.claim_due_runs(A, limit=5) == []


def test_close_ends_a_recurring_campaign_without_new_runs_and_completes_when_its_run_ends(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    schedule = Schedule(recurrence=Daily(times=[LocalTime(0, 0), LocalTime(12, 0)]))
    campaigns.create("prod", "daily", "", canvas(schedule))
    _, first = campaigns.publish("prod", "daily", now=datetime(2024, 1, 1, 11, tzinfo=UTC))
    assert first is not None
    runs.claim_due_runs(A, limit=1)  # the 12:00 run of 1 January 2024 is due: it is running

    closed = lifecycle.close("prod", "daily")

    assert (closed.state, closed.next_run_time) == (CampaignState.CLOSED, None)
    assert campaigns.create_due_runs(300, now=datetime(2024, 1, 2, 0, tzinfo=UTC)) == []
    runs.succeed_run(first, A)
    assert state_of(campaigns, "daily") == CampaignState.COMPLETED


def test_closing_with_only_a_pending_run_cancels_it_and_completes_at_once(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    key = published(campaigns, schedule=Schedule(start_time=LATER))

    closed = lifecycle.close("prod", "spring")

    assert closed.state == CampaignState.COMPLETED
    assert runs.get(key).state == RunState.CANCELLED


def test_a_stopped_campaign_can_be_archived(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    published(campaigns)
    lifecycle.stop("prod", "spring")

    assert lifecycle.archive("prod", "spring").state == CampaignState.ARCHIVED


# -- revert to draft, delete, duplicate -----------------------------------------------------------
def test_revert_to_draft_before_any_send_cancels_the_pending_run_and_allows_publishing_again(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    first = published(campaigns, schedule=Schedule(start_time=LATER))

    draft = lifecycle.revert_to_draft("prod", "spring")

    assert (draft.state, draft.publish_time) == (CampaignState.DRAFT, None)
    assert runs.get(first).state == RunState.CANCELLED
    lifecycle.update("prod", "spring", "Spring again", canvas(), ["display_name"])
    _, second = campaigns.publish("prod", "spring")
    assert second is not None and second != first


def test_revert_to_draft_after_a_message_was_sent_is_refused_naming_the_reason(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    key = published(campaigns)
    runs.claim_due_runs(A, limit=1)
    runs.record_ack(key, A, "email", Ack(sequence=3, sent=1, skipped={"NO_CONSENT": 2}))
    runs.fail_run(key, A, "email", "delivery went away")

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.revert_to_draft("prod", "spring")

    assert (caught.value.reason, caught.value.metadata["sent"]) == ("MESSAGES_SENT", "1")
    assert state_of(campaigns) == CampaignState.COMPLETED


def test_revert_to_draft_while_a_run_is_running_is_refused(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    published(campaigns)
    runs.claim_due_runs(A, limit=1)

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.revert_to_draft("prod", "spring")

    assert caught.value.reason == "RUN_IN_PROGRESS"
    assert state_of(campaigns) == CampaignState.LIVE


def test_a_draft_is_deleted_with_its_runs(campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle) -> None:
    key = published(campaigns, schedule=Schedule(start_time=LATER))
    lifecycle.revert_to_draft("prod", "spring")

    lifecycle.delete("prod", "spring")

    with pytest.raises(NotFound):
        campaigns.get("prod", "spring")
    with pytest.raises(NotFound):
        runs.get(key)


def test_duplicate_makes_a_draft_copy_of_a_published_campaign_idempotently(
    campaigns: CampaignStore, lifecycle: Lifecycle
) -> None:
    published(campaigns)

    copy = lifecycle.duplicate("prod", "spring", "spring-copy", "", "dup-1")
    again = lifecycle.duplicate("prod", "spring", "", "", "dup-1")

    assert (copy.state, copy.display_name, copy.canvas) == (CampaignState.DRAFT, "Spring", canvas())
    assert again.campaign_id == "spring-copy"
    assert state_of(campaigns) == CampaignState.SCHEDULED


# -- signals --------------------------------------------------------------------------------------
def test_a_signal_creates_a_run_with_its_parameters_and_a_repeat_returns_the_same_run(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    _, none = campaigns.publish("prod", "storm")
    assert none is None

    key = lifecycle.signal("prod", "storm", {"city": to_value("Miami")}, "storm-1")
    again = lifecycle.signal("prod", "storm", {"city": to_value("Miami")}, "storm-1")

    assert again == key
    run = runs.get(key)
    assert (run.trigger, run.parameters, run.state) == (
        RunTrigger.SIGNAL,
        {"city": to_value("Miami")},
        RunState.PENDING,
    )


def test_a_second_signal_within_the_interval_is_resource_exhausted_naming_the_limit(
    campaigns: CampaignStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    campaigns.publish("prod", "storm")
    lifecycle.signal("prod", "storm", {}, "storm-1")

    with pytest.raises(ResourceExhausted) as caught:
        lifecycle.signal("prod", "storm", {}, "storm-2")

    assert caught.value.reason == "SIGNAL_RATE_LIMITED"
    assert caught.value.metadata == {"limit": "signal_min_interval_s", "value": "3600"}


def test_the_signal_interval_is_configurable(campaigns: CampaignStore, runs: RunStore) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    campaigns.publish("prod", "storm")
    unlimited = Lifecycle(campaigns, signal_min_interval_s=0)

    first = unlimited.signal("prod", "storm", {}, "storm-1")
    second = unlimited.signal("prod", "storm", {}, "storm-2")

    assert first != second
    assert len(runs.list_runs("prod", "storm")[0]) == 2


@pytest.mark.parametrize(
    ("schedule", "publish", "reason"),
    [
        (SIGNAL, False, "ILLEGAL_TRANSITION"),
        (Schedule(start_time=LATER), True, "NOT_SIGNAL_TRIGGERED"),
    ],
)
def test_a_signal_to_a_draft_or_a_scheduled_campaign_is_refused(
    campaigns: CampaignStore, lifecycle: Lifecycle, schedule: Schedule, publish: bool, reason: str
) -> None:
    campaigns.create("prod", "c", "", canvas(schedule))
    if publish:
        campaigns.publish("prod", "c")

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.signal("prod", "c", {}, "s-1")

    assert caught.value.reason == reason


def test_a_signal_needs_a_request_id_and_well_formed_parameter_names(
    campaigns: CampaignStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    campaigns.publish("prod", "storm")

    with pytest.raises(InvalidArgument) as missing:
        lifecycle.signal("prod", "storm", {}, "")
    with pytest.raises(InvalidArgument) as bad_name:
        lifecycle.signal("prod", "storm", {"Bad Name": to_value(1)}, "s-1")

    assert [v.field for v in missing.value.violations] == ["request_id"]
    assert [v.field for v in bad_name.value.violations] == ["parameters['Bad Name']"]


def test_a_signal_campaign_stays_live_between_runs_and_completes_after_close(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    campaigns.publish("prod", "storm")
    key = lifecycle.signal("prod", "storm", {}, "storm-1")
    runs.claim_due_runs(A, limit=1)
    runs.succeed_run(key, A)
    assert state_of(campaigns, "storm") == CampaignState.LIVE

    assert lifecycle.close("prod", "storm").state == CampaignState.COMPLETED


# -- test mode and restart ------------------------------------------------------------------------
def test_a_test_run_of_a_draft_runs_and_leaves_the_campaign_a_draft(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())

    key = lifecycle.test("prod", "spring", "t-1")
    again = lifecycle.test("prod", "spring", "t-1")
    (claimed,) = runs.claim_due_runs(A, limit=5)
    runs.succeed_run(key, A)

    assert again == key and claimed.run.trigger == RunTrigger.TEST
    assert runs.get(key).state == RunState.SUCCEEDED
    assert state_of(campaigns) == CampaignState.DRAFT


def test_a_published_campaign_cannot_be_tested(campaigns: CampaignStore, lifecycle: Lifecycle) -> None:
    published(campaigns)

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.test("prod", "spring")

    assert caught.value.reason == "ILLEGAL_TRANSITION"


def test_restarting_a_test_run_makes_a_new_test_run(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "spring", "Spring", canvas())
    first = lifecycle.test("prod", "spring")
    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.restart(first)
    assert caught.value.reason == "RUN_NOT_FINISHED"
    runs.claim_due_runs(A, limit=1)
    runs.fail_run(first, A, "audience", "no such entity")

    second = lifecycle.restart(first)

    assert second != first
    assert (runs.get(second).trigger, runs.get(second).state) == (RunTrigger.TEST, RunState.PENDING)
    assert runs.get(first).state == RunState.FAILED


def test_restarting_a_failed_run_resumes_it_in_place_from_its_checkpoint(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    key = published(campaigns)
    runs.claim_due_runs(A, limit=1)
    runs.record_working_set(key, A, "audience", "workingSets/ws1", 9)
    runs.start_task(key, A, "email", targeted=9)
    runs.record_ack(key, A, "email", Ack(sequence=3, sent=3))
    runs.fail_run(key, A, "email", "delivery refused the template")
    assert state_of(campaigns) == CampaignState.COMPLETED

    assert lifecycle.restart(key) == key

    run = runs.get(key)
    audience, email = run.tasks
    assert (run.state, run.error) == (RunState.PENDING, "")
    assert audience.state == TaskState.SUCCEEDED
    assert (email.state, email.checkpoint, email.sent, email.message) == (TaskState.PENDING, 3, 3, "")
    assert state_of(campaigns) == CampaignState.LIVE
    (claimed,) = runs.claim_due_runs(A, limit=1)
    assert claimed.run.tasks[1].checkpoint == 3
    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.restart(key)
    assert caught.value.reason == "RUN_NOT_FINISHED"


def test_a_succeeded_production_run_is_not_restarted(
    campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    key = published(campaigns)
    runs.claim_due_runs(A, limit=1)
    runs.succeed_run(key, A)

    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.restart(key)

    assert caught.value.reason == "RUN_NOT_RESTARTABLE"


async def test_a_suspended_run_resumes_after_a_fix_and_sends_each_recipient_once(
    database: Database, campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    suspending = canvas()
    suspending.error_handling = "suspend"
    campaigns.create("prod", "spring", "", suspending)
    key = campaigns.publish("prod", "spring")[1]
    assert key is not None
    (first,) = runs.claim_due_runs(A, limit=1)
    journal = StoreJournal(database, runs, A)
    no_worker = Engine(FakeAudience(size=7), {}, journal, EngineOptions())

    assert await no_worker.execute(first) == RunState.SUSPENDED
    run = runs.get(key)
    assert (run.state, run.lease_owner, [t.state for t in run.tasks]) == (
        RunState.SUSPENDED,
        None,
        [TaskState.SUCCEEDED, TaskState.FAILED],
    )
    assert runs.claim_due_runs(A, limit=1) == []
    assert state_of(campaigns) == CampaignState.LIVE

    assert lifecycle.restart(key) == key  # the delivery worker is configured now
    (second,) = runs.claim_due_runs(A, limit=1)
    delivery = FakeDelivery()
    fixed = Engine(FakeAudience(size=7), {"email": delivery}, journal, EngineOptions())

    assert await fixed.execute(second) == RunState.SUCCEEDED
    assert delivery.delivered == [f"k{n}" for n in range(1, 8)]
    assert runs.get(key).tasks[1].sent == 7
    assert state_of(campaigns) == CampaignState.COMPLETED


async def test_an_end_activity_signals_another_campaign_once_per_run(
    database: Database, campaigns: CampaignStore, runs: RunStore, lifecycle: Lifecycle
) -> None:
    campaigns.create("prod", "storm", "", canvas(SIGNAL))
    campaigns.publish("prod", "storm")
    end = End(signal_campaign="campaigns/storm", parameters={"city": to_value("Miami")})
    ender = Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("done", kind=end),
        ],
        transitions=[Transition("audience", "done")],
    )
    campaigns.create("prod", "watch", "", ender)
    key = campaigns.publish("prod", "watch")[1]
    assert key is not None
    (claimed,) = runs.claim_due_runs(A, limit=1)
    journal = StoreJournal(database, runs, A, lifecycle)

    assert await Engine(FakeAudience(size=3), {}, journal, EngineOptions()).execute(claimed) == RunState.SUCCEEDED
    # A resumed run signals again with the same request id: it gets the same run back.
    again = await journal.signal_campaign(key, "done", "storm", {"city": to_value("Miami")})

    (signalled,) = runs.list_runs("prod", "storm")[0]
    assert again == signalled.key.name
    assert (signalled.trigger, signalled.parameters) == (RunTrigger.SIGNAL, {"city": to_value("Miami")})
