"""Flow activities in the engine, against fakes: fork, AND-join, test branches (population and
variables, first match wins, default), end, durable waits, named outputs and their counts; and the
canvas rules that go with them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.database import utcnow
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.values import to_value
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import (
    Activity,
    Branch,
    BranchTest,
    BuildAudience,
    Canvas,
    ChannelSend,
    Condition,
    End,
    Fork,
    Join,
    RunState,
    RunTrigger,
    TaskState,
    Transition,
    Wait,
    transition_counts,
)
from scheduler_svc.validation import Limits, validate_campaign
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery, FakeJournal, claimed

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=1, retry_initial_s=0)


def build(activity_id: str, dimension: str = "entities/customers") -> Activity:
    return Activity(activity_id, kind=BuildAudience(query_pb2.AudienceQuery(dimension=dimension)))


def send(activity_id: str, channel: str = "email") -> Activity:
    return Activity(activity_id, kind=ChannelSend(channel, "marketing", "templates/offer", 3, []))


def flow(
    activities: list[Activity], transitions: list[tuple[str, str] | tuple[str, str, str]], **variables: str
) -> Canvas:
    canvas = Canvas(activities=activities, transitions=[Transition(*t) for t in transitions], variables=variables)
    validate_campaign("", canvas, Limits())
    return canvas


def size_test(threshold: int) -> Activity:
    big = Branch("big", Condition(">=", str(threshold)))
    return Activity("size", kind=BranchTest(branches=[big], default_output="small"))


async def execute(canvas: Canvas, audience: FakeAudience, delivery: FakeDelivery, **parameters: object) -> FakeJournal:
    run = claimed(canvas)
    run.run.parameters = {name: to_value(value) for name, value in parameters.items()}
    journal = FakeJournal.of(run)
    await Engine(audience, {"email": delivery, "sms": delivery}, journal, FAST).execute(run)
    return journal


async def test_a_fork_runs_both_branches_on_the_same_population() -> None:
    canvas = flow(
        [build("a"), Activity("f", kind=Fork()), send("mail"), send("text", "sms")],
        [("a", "f"), ("f", "mail"), ("f", "text")],
    )
    delivery = FakeDelivery()

    journal = await execute(canvas, FakeAudience(size=5), delivery)

    assert journal.run.state == RunState.SUCCEEDED
    assert [s.header.activity for s in delivery.streams] == ["mail", "text"]
    assert journal.task("f").outputs == {"": 5}
    assert (journal.task("mail").targeted, journal.task("text").targeted) == (5, 5)


@pytest.mark.parametrize(
    ("threshold", "taken", "skipped"), [(5, "big_mail", "small_mail"), (50, "small_mail", "big_mail")]
)
async def test_a_population_test_takes_one_output_and_skips_the_other_branch(
    threshold: int, taken: str, skipped: str
) -> None:
    canvas = flow(
        [build("a"), size_test(threshold), send("big_mail"), send("small_mail")],
        [("a", "size"), ("size", "big_mail", "big"), ("size", "small_mail", "small")],
    )
    delivery = FakeDelivery()

    journal = await execute(canvas, FakeAudience(size=10), delivery)

    assert journal.run.state == RunState.SUCCEEDED
    assert [s.header.activity for s in delivery.streams] == [taken]
    assert journal.task(skipped).state == TaskState.SKIPPED
    assert journal.task("size").outputs == {("big" if taken == "big_mail" else "small"): 10}
    counts = {(t.target, t.taken, t.count) for t in transition_counts(canvas, journal.run.tasks)}
    assert counts == {("size", True, 10), (taken, True, 10), (skipped, False, 0)}


async def test_the_first_matching_branch_wins_and_a_run_parameter_beats_a_campaign_variable() -> None:
    test = BranchTest(
        branches=[
            Branch("vip", Condition("=", "gold", variable="tier")),
            Branch("any", Condition(">=", "0")),
        ],
        default_output="none",
    )
    canvas = flow(
        [build("a"), Activity("t", kind=test), send("vip"), send("any"), Activity("stop", kind=End())],
        [("a", "t"), ("t", "vip", "vip"), ("t", "any", "any"), ("t", "stop", "none")],
        tier="silver",
    )

    by_variable = await execute(canvas, FakeAudience(size=3), FakeDelivery())
    by_parameter = await execute(canvas, FakeAudience(size=3), FakeDelivery(), tier="gold")

    assert by_variable.task("t").outputs == {"any": 3}
    assert by_parameter.task("t").outputs == {"vip": 3}
    assert by_parameter.task("any").state == TaskState.SKIPPED
    assert by_parameter.task("stop").state == TaskState.SKIPPED


async def test_an_and_join_waits_for_both_inputs_and_passes_on_its_primary_population() -> None:
    audience = FakeAudience(size=6)
    canvas = flow(
        [build("a"), build("b"), Activity("j", kind=Join(primary="b")), send("mail")],
        [("a", "j"), ("b", "j"), ("j", "mail")],
    )

    journal = await execute(canvas, audience, FakeDelivery())

    assert journal.run.state == RunState.SUCCEEDED
    (stream,) = audience.streams
    assert stream.working_set == "workingSets/b"
    assert journal.task("j").outputs == {"": 6}


async def test_an_and_join_is_skipped_when_one_of_its_branches_was_not_taken() -> None:
    canvas = flow(
        [build("a"), size_test(100), Activity("f", kind=Fork()), Activity("j", kind=Join()), send("mail")],
        [("a", "size"), ("a", "f"), ("size", "j", "big"), ("f", "j"), ("size", "mail", "small")],
    )

    journal = await execute(canvas, FakeAudience(size=3), FakeDelivery())

    assert journal.run.state == RunState.SUCCEEDED
    assert journal.task("j").state == TaskState.SKIPPED
    assert journal.task("mail").state == TaskState.SUCCEEDED


async def test_a_wait_suspends_the_run_after_the_other_branches_and_resumes_when_due() -> None:
    canvas = flow(
        [
            build("a"),
            Activity("f", kind=Fork()),
            Activity("later", kind=Wait(duration_s=3600)),
            send("now"),
            send("reminder", "sms"),
        ],
        [("a", "f"), ("f", "later"), ("f", "now"), ("later", "reminder")],
    )
    delivery = FakeDelivery()
    run = claimed(canvas)
    journal = FakeJournal.of(run)
    engine = Engine(FakeAudience(size=4), {"email": delivery, "sms": delivery}, journal, FAST)
    before = utcnow()

    assert await engine.execute(run) == RunState.WAITING

    wait = journal.task("later")
    assert wait.state == TaskState.WAITING and wait.wake_time is not None
    assert before + timedelta(seconds=3600) <= wait.wake_time <= utcnow() + timedelta(seconds=3600)
    assert journal.run.scheduled_time == wait.wake_time
    assert [s.header.activity for s in delivery.streams] == ["now"]
    assert journal.task("reminder").state == TaskState.PENDING

    wait.wake_time = utcnow() - timedelta(seconds=1)  # the timer is due
    assert await engine.execute(run) == RunState.SUCCEEDED
    assert [s.header.activity for s in delivery.streams] == ["now", "reminder"]
    assert journal.task("later").outputs == {"": 4}


# -- canvas rules ---------------------------------------------------------------------------------
def violations(canvas: Canvas) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())
    return [v.field for v in caught.value.violations]


def test_every_test_output_must_be_wired() -> None:
    canvas = Canvas(
        activities=[build("a"), size_test(5), send("mail")],
        transitions=[Transition("a", "size"), Transition("size", "mail", "big")],
    )

    assert violations(canvas) == ["campaign.activities[1].test.default_output"]


def test_a_transition_from_an_unknown_output_names_its_output() -> None:
    canvas = Canvas(
        activities=[build("a"), size_test(5), send("mail"), Activity("e", kind=End())],
        transitions=[
            Transition("a", "size"),
            Transition("size", "mail", "big"),
            Transition("size", "e", "small"),
            Transition("a", "mail", "big"),
        ],
    )

    assert "campaign.transitions[3].output" in violations(canvas)


def test_an_end_activity_has_no_outgoing_transition() -> None:
    canvas = Canvas(
        activities=[build("a"), Activity("e", kind=End()), send("mail")],
        transitions=[Transition("a", "e"), Transition("e", "mail")],
    )

    assert violations(canvas) == ["campaign.transitions[1].source"]


def test_a_join_needs_two_inputs_and_only_a_join_takes_two() -> None:
    canvas = Canvas(
        activities=[build("a"), build("b"), Activity("j", kind=Join()), build("c")],
        transitions=[Transition("a", "j"), Transition("a", "c"), Transition("b", "c")],
    )

    assert violations(canvas) == ["campaign.activities[2]", "campaign.transitions[2].target"]


def test_a_flow_activity_cannot_start_a_canvas() -> None:
    canvas = Canvas(
        activities=[Activity("w", kind=Wait(duration_s=60)), send("mail")],
        transitions=[Transition("w", "mail")],
    )

    assert violations(canvas) == ["campaign.activities[0]"]


def test_a_wait_needs_exactly_one_of_duration_and_until() -> None:
    canvas = Canvas(activities=[build("a"), Activity("w", kind=Wait())], transitions=[Transition("a", "w")])

    assert violations(canvas) == ["campaign.activities[1].wait"]


# -- error handling -------------------------------------------------------------------------------
def two_branches(error_handling: str) -> Canvas:
    canvas = flow(
        [build("a"), Activity("f", kind=Fork()), send("push", "push"), send("mail")],
        [("a", "f"), ("f", "push"), ("f", "mail")],
    )
    canvas.error_handling = error_handling
    return canvas


async def run_without_a_push_worker(canvas: Canvas) -> tuple[RunState, FakeJournal, FakeDelivery]:
    run = claimed(canvas)
    journal = FakeJournal.of(run)
    delivery = FakeDelivery()
    state = await Engine(FakeAudience(size=3), {"email": delivery}, journal, FAST).execute(run)
    return state, journal, delivery


async def test_abort_fails_the_run_at_the_first_failure_and_cancels_the_concurrent_branch() -> None:
    state, journal, delivery = await run_without_a_push_worker(two_branches("abort"))

    assert state == RunState.FAILED
    assert (journal.task("push").state, journal.task("mail").state) == (TaskState.FAILED, TaskState.SKIPPED)
    assert all(stream.cancelled for stream in delivery.streams)


async def test_ignore_lets_the_other_branches_run_then_fails_the_run_naming_the_failure() -> None:
    state, journal, delivery = await run_without_a_push_worker(two_branches("ignore"))

    assert state == RunState.FAILED
    assert (journal.task("push").state, journal.task("mail").state) == (TaskState.FAILED, TaskState.SUCCEEDED)
    assert [s.header.activity for s in delivery.streams] == ["mail"]
    assert "no delivery worker" in journal.task("push").message
    assert journal.run.error == "activities ['push'] failed; the other branches ran"


async def test_suspend_stops_the_run_where_it_failed_and_leaves_the_concurrent_branch_unfinished() -> None:
    state, journal, delivery = await run_without_a_push_worker(two_branches("suspend"))

    assert state == RunState.SUSPENDED and journal.run.state == RunState.SUSPENDED
    assert journal.task("push").state == TaskState.FAILED
    assert journal.task("mail").state in (TaskState.PENDING, TaskState.RUNNING)  # resumed by RestartRun
    assert all(stream.cancelled for stream in delivery.streams)


def test_an_unknown_error_handling_is_named() -> None:
    canvas = Canvas(activities=[build("a")], error_handling="retry")

    assert violations(canvas) == ["campaign.error_handling"]


# -- end ------------------------------------------------------------------------------------------
def ending_with_a_signal() -> Canvas:
    end = End(signal_campaign="campaigns/storm", parameters={"city": to_value("Miami")})
    return flow([build("a"), Activity("done", kind=end)], [("a", "done")])


async def test_an_end_activity_signals_its_campaign_with_its_parameters() -> None:
    run = claimed(ending_with_a_signal())
    journal = FakeJournal.of(run)

    assert await Engine(FakeAudience(size=2), {}, journal, FAST).execute(run) == RunState.SUCCEEDED

    assert journal.signals == [("done", "storm", {"city": to_value("Miami")})]
    assert journal.notes["done"] == "branch ended; signalled campaigns/storm: campaigns/storm/runs/signalled-1"


async def test_in_test_mode_an_end_activity_only_says_whom_it_would_signal() -> None:
    run = claimed(ending_with_a_signal())
    run.run.trigger = RunTrigger.TEST
    journal = FakeJournal.of(run)

    assert await Engine(FakeAudience(size=2), {}, journal, FAST).execute(run) == RunState.SUCCEEDED

    assert journal.signals == []
    assert journal.notes["done"] == "branch ended; test mode: would signal campaigns/storm"


def test_an_end_signal_needs_a_campaign_name() -> None:
    canvas = Canvas(
        activities=[build("a"), Activity("done", kind=End(signal_campaign="storm"))],
        transitions=[Transition("a", "done")],
    )

    assert violations(canvas) == ["campaign.activities[1].end.signal_campaign"]
