"""Canvas validation names the offending field; guardrails name their limit; activities run in DAG order."""

from __future__ import annotations

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.errors import InvalidArgument, ResourceExhausted
from scheduler_svc.model import Activity, BuildAudience, Canvas, ChannelSend, Schedule, Transition
from scheduler_svc.validation import Limits, find_cycle, topological_order, validate_campaign


def audience(activity_id: str, dimension: str = "entities/customers") -> Activity:
    return Activity(activity_id, kind=BuildAudience(query_pb2.AudienceQuery(dimension=dimension)))


def email(activity_id: str, **changes: object) -> Activity:
    send = ChannelSend(channel="email", category="marketing", template="templates/offer", batch_size=100)
    for name, value in changes.items():
        setattr(send, name, value)
    return Activity(activity_id, kind=send)


def canvas(*activities: Activity, transitions: tuple[tuple[str, str], ...] = (), zone: str = "") -> Canvas:
    return Canvas(
        activities=list(activities),
        transitions=[Transition(s, t) for s, t in transitions],
        schedule=Schedule(time_zone=zone),
    )


def fields_of(bad: Canvas, display_name: str = "") -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_campaign(display_name, bad, Limits())
    assert caught.value.reason == "INVALID_CANVAS"
    return [v.field for v in caught.value.violations]


def test_a_build_then_email_canvas_is_valid() -> None:
    validate_campaign("Spring", canvas(audience("a"), email("e"), transitions=(("a", "e"),)), Limits())


def test_a_campaign_without_activities_names_the_activities_field() -> None:
    assert fields_of(canvas()) == ["campaign.activities"]


@pytest.mark.parametrize("bad_id", ["", "Upper", "1st", "has space", "x" * 64])
def test_an_invalid_activity_id_names_that_id(bad_id: str) -> None:
    assert fields_of(canvas(audience(bad_id))) == ["campaign.activities[0].id"]


def test_a_duplicate_activity_id_names_the_second_one() -> None:
    assert fields_of(canvas(audience("a"), audience("a"))) == ["campaign.activities[1].id"]


def test_an_activity_without_a_kind_names_its_kind() -> None:
    assert fields_of(canvas(audience("a"), Activity("b"))) == ["campaign.activities[1].kind"]


@pytest.mark.parametrize("dimension", ["", "customers", "entities/", "profiles/customers", "entities/a/b"])
def test_a_malformed_query_dimension_names_it(dimension: str) -> None:
    assert fields_of(canvas(audience("a", dimension))) == ["campaign.activities[0].build_audience.query.dimension"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"channel": ""}, "channel"),
        ({"category": ""}, "category"),
        ({"template": "offer"}, "template"),
        ({"template": ""}, "template"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 10001}, "batch_size"),
        ({"target_attributes": ["tier", "Bad Name"]}, "target_attributes[1]"),
        ({"target_attributes": ["tier", "tier"]}, "target_attributes[1]"),
    ],
)
def test_a_bad_channel_setting_names_its_field(changes: dict[str, object], field: str) -> None:
    bad = canvas(audience("a"), email("e", **changes), transitions=(("a", "e"),))
    assert fields_of(bad) == [f"campaign.activities[1].channel.{field}"]


@pytest.mark.parametrize("batch_size", [0, 1, 10000])
def test_batch_sizes_from_zero_to_ten_thousand_are_accepted(batch_size: int) -> None:
    validate_campaign("", canvas(audience("a"), email("e", batch_size=batch_size), transitions=(("a", "e"),)), Limits())


@pytest.mark.parametrize("end", ["source", "target"])
def test_a_transition_to_or_from_an_unknown_activity_names_that_end(end: str) -> None:
    pair = ("nope", "a") if end == "source" else ("a", "nope")
    assert fields_of(canvas(audience("a"), transitions=(pair,))) == [f"campaign.transitions[0].{end}"]


def test_a_self_loop_names_the_transition_target() -> None:
    assert fields_of(canvas(audience("a"), transitions=(("a", "a"),))) == ["campaign.transitions[0].target"]


def test_a_cycle_names_the_transition_that_closes_it() -> None:
    bad = canvas(audience("a"), audience("b"), audience("c"), transitions=(("a", "b"), ("b", "c"), ("c", "a")))
    assert fields_of(bad) == ["campaign.transitions[2]"]


def test_a_cycle_below_an_acyclic_start_is_found() -> None:
    transitions = [Transition("a", "b"), Transition("b", "c"), Transition("c", "d"), Transition("d", "b")]
    assert find_cycle(["a", "b", "c", "d"], transitions) == [1, 2, 3]


def test_a_diamond_has_no_cycle() -> None:
    transitions = [Transition("a", "b"), Transition("a", "c"), Transition("b", "d"), Transition("c", "d")]
    assert find_cycle(["a", "b", "c", "d"], transitions) is None


def test_a_duplicate_transition_names_the_second_one() -> None:
    bad = canvas(audience("a"), email("e"), transitions=(("a", "e"), ("a", "e")))
    assert fields_of(bad) == ["campaign.transitions[1]"]


def test_a_channel_activity_without_an_incoming_transition_names_the_activity() -> None:
    assert fields_of(canvas(audience("a"), email("e"))) == ["campaign.activities[1]"]


def test_a_channel_activity_with_two_incoming_transitions_names_the_extra_one() -> None:
    bad = canvas(audience("a"), audience("b"), email("e"), transitions=(("a", "e"), ("b", "e")))
    assert fields_of(bad) == ["campaign.transitions[1].target"]


def test_a_channel_activity_fed_by_another_channel_activity_names_the_transition_source() -> None:
    bad = canvas(audience("a"), email("e1"), email("e2"), transitions=(("a", "e1"), ("e1", "e2")))
    assert fields_of(bad) == ["campaign.transitions[1].source"]


def test_an_unknown_time_zone_names_the_schedule_time_zone() -> None:
    assert fields_of(canvas(audience("a"), zone="Mars/Olympus")) == ["campaign.schedule.time_zone"]


def test_an_iana_time_zone_is_accepted() -> None:
    validate_campaign("", canvas(audience("a"), zone="Europe/Stockholm"), Limits())


def test_a_too_long_display_name_is_named() -> None:
    assert fields_of(canvas(audience("a")), display_name="x" * 201) == ["campaign.display_name"]


def test_every_problem_is_reported_at_once() -> None:
    bad = canvas(
        audience("a", "customers"),
        email("e", template="nope"),
        transitions=(("a", "e"), ("a", "ghost")),
        zone="Nowhere",
    )
    assert fields_of(bad) == [
        "campaign.activities[0].build_audience.query.dimension",
        "campaign.activities[1].channel.template",
        "campaign.transitions[1].target",
        "campaign.schedule.time_zone",
    ]


def test_more_activities_than_max_activities_is_resource_exhausted_naming_the_limit() -> None:
    too_many = canvas(*[audience(f"a{i}") for i in range(4)])
    with pytest.raises(ResourceExhausted) as caught:
        validate_campaign("", too_many, Limits(max_activities=3))
    assert caught.value.reason == "TOO_MANY_ACTIVITIES"
    assert caught.value.metadata["limit"] == "max_activities"
    assert [v.field for v in caught.value.violations] == ["campaign.activities"]


def test_more_channel_activities_than_allowed_is_resource_exhausted_naming_the_limit() -> None:
    activities = [audience("a"), *[email(f"e{i}") for i in range(3)]]
    too_many = canvas(*activities, transitions=tuple(("a", f"e{i}") for i in range(3)))
    with pytest.raises(ResourceExhausted) as caught:
        validate_campaign("", too_many, Limits(max_channel_activities=2))
    assert caught.value.reason == "TOO_MANY_CHANNEL_ACTIVITIES"
    assert caught.value.metadata["limit"] == "max_channel_activities"


def test_the_execution_order_puts_every_source_before_its_targets() -> None:
    dag = canvas(
        email("mail"),
        audience("late"),
        audience("early"),
        transitions=(("early", "late"), ("late", "mail")),
    )
    assert topological_order(dag) == ["early", "late", "mail"]


def test_independent_activities_keep_their_canvas_order() -> None:
    dag = canvas(audience("b"), audience("a"), email("eb"), email("ea"), transitions=(("a", "ea"), ("b", "eb")))
    assert topological_order(dag) == ["b", "a", "eb", "ea"]
