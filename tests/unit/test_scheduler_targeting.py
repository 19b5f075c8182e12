"""Targeting activities on the canvas, against fakes: combine (with complements), change of
dimension, split, deduplication, reconciliation, incremental builds, read and save audience — their
working sets and counts per output, test mode, resume — and the canvas rules that go with them
(outputs wired, dimensions along the transitions)."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon_chassis.errors import InvalidArgument
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    Canvas,
    ChangeDimension,
    ChannelSend,
    Combine,
    Deduplicate,
    End,
    ReadAudience,
    Reconcile,
    RunState,
    RunTrigger,
    SaveAudience,
    Split,
    SplitSubset,
    Task,
    TaskState,
    Transition,
    transition_counts,
)
from scheduler_svc.validation import Limits, validate_campaign
from tests.unit.test_scheduler_fakes import FakeAudience, FakeDelivery, FakeJournal, claimed

FAST = EngineOptions(max_unacked_batches=2, default_batch_size=4, activity_attempts=1, retry_initial_s=0)
CUSTOMERS = "entities/customers"
BOOKINGS = "entities/bookings"


def build(activity_id: str, dimension: str = CUSTOMERS) -> Activity:
    return Activity(activity_id, kind=BuildAudience(query_pb2.AudienceQuery(dimension=dimension)))


def send(activity_id: str) -> Activity:
    return Activity(activity_id, kind=ChannelSend("email", "marketing", "templates/offer", 3, []))


def end(activity_id: str) -> Activity:
    return Activity(activity_id, kind=End())


def canvas_of(activities: list[Activity], transitions: list[tuple[str, ...]]) -> Canvas:
    canvas = Canvas(activities=activities, transitions=[Transition(*t) for t in transitions])
    validate_campaign("", canvas, Limits())
    return canvas


def violations(canvas: Canvas) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())
    return [v.field for v in caught.value.violations]


def keys(first: int, last: int) -> list[str]:
    return [f"k{n}" for n in range(first, last + 1)]


async def execute(
    canvas: Canvas, audience: FakeAudience, delivery: FakeDelivery | None = None, *, test_mode: bool = False
) -> FakeJournal:
    run = claimed(canvas)
    if test_mode:
        run.run.trigger = RunTrigger.TEST
    journal = FakeJournal.of(run)
    await Engine(audience, {"email": delivery or FakeDelivery()}, journal, FAST).execute(run)
    return journal


def combined(operation: str, complement: str = "") -> Canvas:
    return canvas_of(
        [
            build("a"),
            build("b"),
            Activity("both", kind=Combine(operation, primary="a", complement_output=complement)),
            send("mail"),
            *([end("rest_end")] if complement else []),
        ],
        [("a", "both"), ("b", "both"), ("both", "mail"), *([("both", "rest_end", complement)] if complement else [])],
    )


def two_populations() -> FakeAudience:
    return FakeAudience(members={"workingSets/a": keys(1, 10), "workingSets/b": ["k2", "k4", "k6", "k12"]})


# -- combine ---------------------------------------------------------------------------------------
async def test_an_intersection_passes_on_the_common_records_and_its_complement_the_others() -> None:
    audience, delivery = two_populations(), FakeDelivery()

    journal = await execute(combined("intersection", "rest"), audience, delivery)

    assert journal.run.state == RunState.SUCCEEDED
    both = journal.task("both")
    assert both.outputs == {"": 3, "rest": 8}
    assert audience.members[both.output_working_sets[""]] == ["k2", "k4", "k6"]
    assert sorted(audience.members[both.output_working_sets["rest"]]) == sorted(
        ["k1", "k3", "k5", "k7", "k8", "k9", "k10", "k12"]
    )
    assert delivery.delivered == ["k2", "k4", "k6"]


async def test_an_exclusion_removes_the_others_from_the_primary_and_its_complement_is_what_was_removed() -> None:
    audience = two_populations()

    journal = await execute(combined("exclusion", "removed"), audience)

    both = journal.task("both")
    assert both.outputs == {"": 7, "removed": 3}
    assert audience.members[both.output_working_sets[""]] == ["k1", "k3", "k5", "k7", "k8", "k9", "k10"]
    assert audience.members[both.output_working_sets["removed"]] == ["k2", "k4", "k6"]


async def test_a_union_combines_every_input_once() -> None:
    audience = two_populations()

    journal = await execute(combined("union"), audience)

    assert journal.task("both").outputs == {"": 11}
    counts = transition_counts(combined("union"), journal.run.tasks)
    assert [(t.source, t.target, t.count) for t in counts] == [
        ("a", "both", 10),
        ("b", "both", 4),
        ("both", "mail", 11),
    ]


async def test_a_combine_is_skipped_when_one_of_its_inputs_was_not_taken() -> None:
    canvas = combined("union")
    run = claimed(canvas)
    journal = FakeJournal.of(run)
    run.run.tasks[1].state = TaskState.SKIPPED  # "b" was not taken

    await Engine(two_populations(), {"email": FakeDelivery()}, journal, FAST).execute(run)

    assert (journal.task("both").state, journal.task("mail").state) == (TaskState.SKIPPED, TaskState.SKIPPED)


# -- change of dimension ---------------------------------------------------------------------------
def booking_canvas() -> Canvas:
    return canvas_of(
        [build("customers"), Activity("to_bookings", kind=ChangeDimension("bookings", BOOKINGS)), end("done")],
        [("customers", "to_bookings"), ("to_bookings", "done")],
    )


async def test_a_change_of_dimension_passes_on_the_linked_records_and_counts_the_unmatched() -> None:
    audience = FakeAudience(size=10, links={"bookings": (BOOKINGS, {"k1": "b1", "k2": "b2", "k3": "b2"})})

    journal = await execute(booking_canvas(), audience)

    task = journal.task("to_bookings")
    assert (task.state, task.targeted, task.outputs) == (TaskState.SUCCEEDED, 2, {"": 2})
    assert audience.members[task.working_set] == ["b1", "b2"]
    assert journal.notes["to_bookings"] == (
        "changed dimension to entities/bookings: 2 records; 7 source records unmatched"
    )


async def test_a_link_that_leads_to_another_dimension_than_the_canvas_says_fails_the_run() -> None:
    audience = FakeAudience(size=4, links={"bookings": ("entities/hotels", {"k1": "h1"})})

    journal = await execute(booking_canvas(), audience)

    assert journal.run.state == RunState.FAILED
    assert journal.task("to_bookings").message == (
        "the link 'bookings' leads to entities/hotels, not entities/bookings as the canvas says"
    )


# -- split -----------------------------------------------------------------------------------------
def split_canvas(overlap: bool = False) -> Canvas:
    subsets = [SplitSubset("even", limit=2), SplitSubset("high")]
    return canvas_of(
        [
            build("a"),
            Activity("split", kind=Split(subsets=subsets, complement_output="others", overlap=overlap)),
            send("mail"),
            end("high_end"),
            end("others_end"),
        ],
        [("a", "split"), ("split", "mail", "even"), ("split", "high_end", "high"), ("split", "others_end", "others")],
    )


def split_audience() -> FakeAudience:
    return FakeAudience(
        size=10,
        split_rules={
            "split--even": lambda k: int(k[1:]) % 2 == 0,
            "split--high": lambda k: int(k[1:]) > 5,
        },
    )


async def test_a_split_passes_each_ordered_subset_and_the_complement_on_its_own_output() -> None:
    audience, delivery = split_audience(), FakeDelivery()

    journal = await execute(split_canvas(), audience, delivery)

    task = journal.task("split")
    assert task.outputs == {"even": 2, "high": 5, "others": 3}
    assert {o: audience.members[w] for o, w in task.output_working_sets.items()} == {
        "even": ["k2", "k4"],
        "high": ["k6", "k7", "k8", "k9", "k10"],
        "others": ["k1", "k3", "k5"],
    }
    assert delivery.delivered == ["k2", "k4"]
    assert [(t.source, t.output, t.taken, t.count) for t in transition_counts(split_canvas(), journal.run.tasks)] == [
        ("a", "", True, 10),
        ("split", "even", True, 2),
        ("split", "high", True, 5),
        ("split", "others", True, 3),
    ]


async def test_a_resumed_run_sends_a_split_output_from_its_stored_working_set_without_splitting_again() -> None:
    canvas = split_canvas()
    audience, delivery = split_audience(), FakeDelivery()
    audience.members["workingSets/split--even"] = ["k2", "k4"]
    done = Task("split", TaskState.SUCCEEDED, targeted=2, outputs={"even": 2, "high": 5, "others": 3})
    done.output_working_sets = {"even": "workingSets/split--even", "high": "x", "others": "y"}
    tasks = [Task("a", TaskState.SUCCEEDED, targeted=10, working_set="workingSets/a", outputs={"": 10}), done]
    run = claimed(canvas, tasks=tasks + [Task(a) for a in ("mail", "high_end", "others_end")])
    journal = FakeJournal.of(run)

    assert await Engine(audience, {"email": delivery}, journal, FAST).execute(run) == RunState.SUCCEEDED
    assert audience.calls == []
    assert delivery.delivered == ["k2", "k4"]


def test_every_output_of_a_split_needs_a_transition() -> None:
    canvas = Canvas(
        activities=[build("a"), Activity("split", kind=Split([SplitSubset("one"), SplitSubset("two")])), end("e")],
        transitions=[Transition("a", "split"), Transition("split", "e", "one")],
    )

    assert violations(canvas) == ["campaign.activities[1]"]


def test_a_transition_from_a_split_names_one_of_its_outputs() -> None:
    canvas = Canvas(
        activities=[build("a"), Activity("split", kind=Split([SplitSubset("one")])), end("e")],
        transitions=[Transition("a", "split"), Transition("split", "e", "two")],
    )

    assert violations(canvas) == ["campaign.transitions[1].output", "campaign.activities[1]"]


def test_split_outputs_are_distinct_and_their_limits_valid() -> None:
    split = Split([SplitSubset("one", limit=-1), SplitSubset("one", limit=3, limit_percent=10)])
    canvas = Canvas(
        activities=[build("a"), Activity("split", kind=split), end("e")],
        transitions=[Transition("a", "split"), Transition("split", "e", "one")],
    )

    assert violations(canvas) == [
        "campaign.activities[1].split.subsets[0].limit",
        "campaign.activities[1].split.subsets[1].output",
        "campaign.activities[1].split.subsets[1].limit_percent",
    ]


# -- deduplication ---------------------------------------------------------------------------------
async def test_a_deduplication_passes_on_the_kept_records_and_the_removed_ones_on_their_output() -> None:
    canvas = canvas_of(
        [
            build("a"),
            Activity("dedup", kind=Deduplicate(fields=["email"], attribute="version", removed_output="dropped")),
            send("mail"),
            end("dropped_end"),
        ],
        [("a", "dedup"), ("dedup", "mail"), ("dedup", "dropped_end", "dropped")],
    )
    audience, delivery = FakeAudience(size=6, duplicates={"k3", "k5"}), FakeDelivery()

    journal = await execute(canvas, audience, delivery)

    assert journal.task("dedup").outputs == {"": 4, "dropped": 2}
    assert delivery.delivered == ["k1", "k2", "k4", "k6"]
    assert audience.members[journal.task("dedup").output_working_sets["dropped"]] == ["k3", "k5"]


def test_a_deduplication_needs_fields_and_the_attribute_its_method_looks_at() -> None:
    canvas = Canvas(
        activities=[build("a"), Activity("dedup", kind=Deduplicate(method="highest")), end("e")],
        transitions=[Transition("a", "dedup"), Transition("dedup", "e")],
    )

    assert violations(canvas) == [
        "campaign.activities[1].deduplicate.fields",
        "campaign.activities[1].deduplicate.attribute",
    ]


# -- read and save audience ------------------------------------------------------------------------
def read_and_save() -> Canvas:
    return canvas_of(
        [
            Activity("vip", kind=ReadAudience("audiences/vip", CUSTOMERS)),
            Activity("keep", kind=SaveAudience("vip-copy", "VIP copy")),
            send("mail"),
        ],
        [("vip", "keep"), ("keep", "mail")],
    )


async def test_a_saved_audience_is_read_saved_again_and_sent_to() -> None:
    audience = FakeAudience(audiences={"audiences/vip": (CUSTOMERS, ["k1", "k5", "k9"])})
    delivery = FakeDelivery()

    journal = await execute(read_and_save(), audience, delivery)

    assert journal.run.state == RunState.SUCCEEDED
    assert (journal.task("vip").targeted, journal.task("keep").outputs) == (3, {"": 3})
    assert audience.saved == {"vip-copy": ["k1", "k5", "k9"]}
    assert journal.notes["keep"] == "created audiences/vip-copy with 3 records"
    assert delivery.delivered == ["k1", "k5", "k9"]


async def test_in_test_mode_save_audience_saves_nothing() -> None:
    audience = FakeAudience(audiences={"audiences/vip": (CUSTOMERS, ["k1", "k5", "k9"])})

    journal = await execute(read_and_save(), audience, test_mode=True)

    assert journal.run.state == RunState.SUCCEEDED
    assert audience.saved == {}
    assert journal.notes["keep"] == "test mode: would save 3 records as audiences/vip-copy; nothing was saved"


async def test_reading_an_audience_of_another_dimension_than_the_canvas_says_fails_the_run() -> None:
    audience = FakeAudience(audiences={"audiences/vip": (BOOKINGS, ["b1"])})

    journal = await execute(read_and_save(), audience)

    assert journal.run.state == RunState.FAILED
    assert journal.task("vip").state == TaskState.FAILED


# -- dimensions along the canvas -------------------------------------------------------------------
def test_a_combine_of_two_dimensions_is_refused_naming_the_transition() -> None:
    canvas = Canvas(
        activities=[build("a"), build("b", BOOKINGS), Activity("both", kind=Combine("union")), end("e")],
        transitions=[Transition("a", "both"), Transition("b", "both"), Transition("both", "e")],
    )

    assert violations(canvas) == ["campaign.transitions[1].source"]


def test_a_change_of_dimension_makes_a_population_combinable_with_one_of_the_new_dimension() -> None:
    canvas_of(
        [
            build("customers"),
            Activity("to_bookings", kind=ChangeDimension("bookings", BOOKINGS)),
            build("paris", BOOKINGS),
            Activity("both", kind=Combine("intersection", primary="to_bookings")),
            end("e"),
        ],
        [("customers", "to_bookings"), ("to_bookings", "both"), ("paris", "both"), ("both", "e")],
    )


def test_a_change_of_dimension_after_which_the_old_dimension_is_combined_is_refused() -> None:
    canvas = Canvas(
        activities=[
            build("customers"),
            Activity("to_bookings", kind=ChangeDimension("bookings", BOOKINGS)),
            build("others"),
            Activity("both", kind=Combine("union", primary="others")),
            end("e"),
        ],
        transitions=[
            Transition("customers", "to_bookings"),
            Transition("to_bookings", "both"),
            Transition("others", "both"),
            Transition("both", "e"),
        ],
    )

    assert violations(canvas) == ["campaign.transitions[1].source"]


def test_a_union_has_no_complement_and_a_combine_needs_two_inputs() -> None:
    canvas = Canvas(
        activities=[
            build("a"),
            Activity("both", kind=Combine("union", complement_output="rest")),
            end("e"),
            end("rest_end"),
        ],
        transitions=[Transition("a", "both"), Transition("both", "e"), Transition("both", "rest_end", "rest")],
    )

    assert violations(canvas) == ["campaign.activities[1].combine.complement_output", "campaign.activities[1]"]


def test_targeting_activities_name_their_bad_fields() -> None:
    canvas = Canvas(
        activities=[
            Activity("vip", kind=ReadAudience("vip", "")),
            Activity("move", kind=ChangeDimension("Bad Link", "entities/x")),
            Activity("keep", kind=SaveAudience("Not An Id")),
        ],
        transitions=[Transition("vip", "move"), Transition("move", "keep")],
    )

    assert violations(canvas) == [
        "campaign.activities[0].read_audience.audience",
        "campaign.activities[0].read_audience.dimension",
        "campaign.activities[1].change_dimension.link",
        "campaign.activities[2].save_audience.audience_id",
    ]


# -- reconciliation --------------------------------------------------------------------------------
def reconciling(unreconciled: str = "lost") -> Canvas:
    return canvas_of(
        [
            build("bookings", BOOKINGS),
            Activity("owners", kind=Reconcile(CUSTOMERS, [("customer_id", "id")], unreconciled)),
            send("mail"),
            end("lost_end"),
        ],
        [("bookings", "owners"), ("owners", "mail"), ("owners", "lost_end", unreconciled)],
    )


async def test_a_reconciliation_passes_on_each_single_match_once_and_the_rest_on_its_output() -> None:
    audience, delivery = FakeAudience(size=5), FakeDelivery()
    audience.matches = {"k1": ["k7"], "k2": ["k7"], "k3": ["k8"], "k4": ["k8", "k9"]}  # k5 matches nothing

    journal = await execute(reconciling(), audience, delivery)

    task = journal.task("owners")
    assert task.outputs == {"": 2, "lost": 2}
    assert audience.members[task.output_working_sets[""]] == ["k7", "k8"]
    assert audience.members[task.output_working_sets["lost"]] == ["k4", "k5"]
    assert journal.notes["owners"] == "reconciled with entities/customers: 3 matched, 1 unmatched, 1 ambiguous"
    assert delivery.delivered == ["k7", "k8"]


def test_the_unreconciled_output_keeps_the_incoming_dimension() -> None:
    canvas = Canvas(
        activities=[
            build("bookings", BOOKINGS),
            Activity("owners", kind=Reconcile(CUSTOMERS, [("customer_id", "id")], "lost")),
            build("paris", BOOKINGS),
            build("gold", CUSTOMERS),
            Activity("lost_paris", kind=Combine("intersection", primary="paris")),
            Activity("gold_owners", kind=Combine("intersection", primary="gold")),
            end("e1"),
            end("e2"),
        ],
        transitions=[
            Transition("bookings", "owners"),
            Transition("owners", "lost_paris", "lost"),
            Transition("paris", "lost_paris"),
            Transition("owners", "gold_owners"),
            Transition("gold", "gold_owners"),
            Transition("lost_paris", "e1"),
            Transition("gold_owners", "e2"),
        ],
    )
    validate_campaign("", canvas, Limits())

    canvas.transitions[1] = Transition("owners", "lost_paris", "")
    canvas.transitions[3] = Transition("owners", "gold_owners", "lost")
    assert violations(canvas) == ["campaign.transitions[1].source", "campaign.transitions[3].source"]


def test_a_reconciliation_needs_a_target_and_pairs() -> None:
    canvas = Canvas(
        activities=[build("bookings", BOOKINGS), Activity("owners", kind=Reconcile("customers", [])), end("e")],
        transitions=[Transition("bookings", "owners"), Transition("owners", "e")],
    )

    assert violations(canvas) == ["campaign.activities[1].reconcile.target", "campaign.activities[1].reconcile.pairs"]


# -- incremental builds ----------------------------------------------------------------------------
def incremental_canvas(mode: working_set_pb2.Incremental) -> Canvas:
    query = query_pb2.AudienceQuery(dimension=CUSTOMERS)
    return canvas_of(
        [Activity("new", kind=BuildAudience(query, incremental=mode)), send("mail")],
        [("new", "mail")],
    )


async def test_an_incremental_build_sends_only_the_records_earlier_runs_did_not_produce() -> None:
    mode = working_set_pb2.Incremental(processed_keys=working_set_pb2.IncrementalProcessedKeys())
    audience = FakeAudience(size=5, produced={"k1", "k2"})
    delivery = FakeDelivery()

    journal = await execute(incremental_canvas(mode), audience, delivery)

    assert (journal.task("new").targeted, journal.task("new").outputs) == (3, {"": 3})
    assert journal.notes["new"] == (
        "working set workingSets/new built incrementally: 3 records; 2 left out (produced by earlier runs)"
    )
    assert audience.incremental_modes == ["processed_keys"]
    assert delivery.delivered == ["k3", "k4", "k5"]


def test_an_incremental_build_needs_a_mode_and_a_valid_window_or_attribute() -> None:
    def problems(mode: working_set_pb2.Incremental) -> list[str]:
        query = query_pb2.AudienceQuery(dimension=CUSTOMERS)
        canvas = Canvas(
            activities=[Activity("new", kind=BuildAudience(query, incremental=mode)), end("e")],
            transitions=[Transition("new", "e")],
        )
        return violations(canvas)

    negative = working_set_pb2.IncrementalProcessedKeys(history_window=duration_pb2.Duration(seconds=-1))
    assert problems(working_set_pb2.Incremental()) == ["campaign.activities[0].build_audience.incremental.mode"]
    assert problems(working_set_pb2.Incremental(processed_keys=negative)) == [
        "campaign.activities[0].build_audience.incremental.processed_keys.history_window"
    ]
    assert problems(working_set_pb2.Incremental(watermark=working_set_pb2.IncrementalWatermark())) == [
        "campaign.activities[0].build_audience.incremental.watermark.attribute"
    ]
