"""Signal parameters must be scalar Values (branch conditions read them as scalars), on both backends.

A signal with a list, a struct or a malformed scalar is refused with INVALID_ARGUMENT naming the
parameter, and creates no run; so is an End activity that would signal another campaign with one.
"""

from __future__ import annotations

import pytest

from carillon.audience.v1 import query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.errors import InvalidArgument
from carillon_chassis.values import to_value
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import Activity, BuildAudience, Canvas, ChannelSend, End, Schedule, Transition
from scheduler_svc.runs import RunStore
from scheduler_svc.validation import Limits, validate_campaign

NOT_SCALAR = [
    pytest.param(to_value(["a", "b"]), id="list"),
    pytest.param(to_value({"a": 1}), id="struct"),
    pytest.param(value_pb2.Value(date_value="not a date"), id="bad-date"),
    pytest.param(value_pb2.Value(decimal_value="twelve"), id="bad-decimal"),
]


def canvas(*extra: Activity, schedule: Schedule | None = None) -> Canvas:
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 3, [])),
            *extra,
        ],
        transitions=[Transition("audience", "email"), *[Transition("email", a.id) for a in extra]],
        schedule=schedule or Schedule(),
    )


@pytest.mark.parametrize("value", NOT_SCALAR)
def test_a_signal_with_a_non_scalar_parameter_is_invalid_argument_and_creates_no_run(
    campaigns: CampaignStore, runs: RunStore, value: value_pb2.Value
) -> None:
    campaigns.create("prod", "storm", "", canvas(schedule=Schedule(signal=True)))
    campaigns.publish("prod", "storm")

    with pytest.raises(InvalidArgument) as caught:
        Lifecycle(campaigns).signal("prod", "storm", {"city": to_value("Miami"), "zones": value}, "storm-1")

    assert [v.field for v in caught.value.violations] == ["parameters['zones']"]
    assert runs.list_runs("prod", "storm")[0] == []


def test_a_signal_with_scalar_parameters_creates_a_run(campaigns: CampaignStore, runs: RunStore) -> None:
    campaigns.create("prod", "storm", "", canvas(schedule=Schedule(signal=True)))
    campaigns.publish("prod", "storm")
    parameters = {"city": to_value("Miami"), "n": to_value(3), "day": value_pb2.Value(date_value="2026-03-01")}

    key = Lifecycle(campaigns).signal("prod", "storm", parameters, "storm-1")

    assert runs.get(key).parameters == parameters


@pytest.mark.parametrize("value", NOT_SCALAR)
def test_an_end_signalling_with_a_non_scalar_parameter_is_an_invalid_canvas(value: value_pb2.Value) -> None:
    end = Activity("done", kind=End(signal_campaign="campaigns/storm", parameters={"zones": value}))

    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas(end), Limits())

    assert [v.field for v in caught.value.violations] == ["campaign.activities[2].end.parameters['zones']"]
