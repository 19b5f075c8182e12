"""Launch times of schedules: DST in Europe/Stockholm and America/New_York, month ends, n-th weekdays,
validity windows, and the validation of schedules.

Expected instants are written by hand from the published transition dates: in 2024 Europe/Stockholm
moved 02:00 CET -> 03:00 CEST on 31 March and 03:00 CEST -> 02:00 CET on 27 October; America/New_York
moved 02:00 EST -> 03:00 EDT on 10 March and 02:00 EDT -> 01:00 EST on 3 November.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from carillon.audience.v1 import query_pb2
from carillon_chassis.errors import InvalidArgument
from scheduler_svc.model import (
    Activity,
    BuildAudience,
    Canvas,
    Daily,
    Interval,
    LocalTime,
    Monthly,
    Recurrence,
    Schedule,
    Weekly,
)
from scheduler_svc.schedules import launch_times, next_launch, schedule_violations
from scheduler_svc.validation import Limits, validate_campaign

MON, TUE, WED, THU, FRI, SAT, SUN = range(1, 8)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def times(
    recurrence: Recurrence,
    after: datetime,
    count: int,
    zone: str = "UTC",
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
) -> list[datetime]:
    schedule = Schedule(time_zone=zone, recurrence=recurrence, valid_from=valid_from, valid_until=valid_until)
    return launch_times(schedule, after, count)


# -- Europe/Stockholm ----------------------------------------------------------------------------
def test_a_daily_time_skipped_by_the_stockholm_spring_change_moves_forward_by_the_jump() -> None:
    launches = times(Daily(times=[LocalTime(2, 30)]), utc(2024, 3, 29, 12), 3, "Europe/Stockholm")

    assert launches == [
        utc(2024, 3, 30, 1, 30),  # 02:30 CET
        utc(2024, 3, 31, 1, 30),  # 02:30 does not exist: 03:30 CEST
        utc(2024, 4, 1, 0, 30),  # 02:30 CEST
    ]


def test_a_daily_time_repeated_by_the_stockholm_autumn_change_fires_once_at_its_first_occurrence() -> None:
    launches = times(Daily(times=[LocalTime(2, 30)]), utc(2024, 10, 25, 12), 3, "Europe/Stockholm")

    assert launches == [
        utc(2024, 10, 26, 0, 30),  # 02:30 CEST
        utc(2024, 10, 27, 0, 30),  # 02:30 CEST, the first of the two; not again at 01:30 UTC
        utc(2024, 10, 28, 1, 30),  # 02:30 CET
    ]


def test_a_stockholm_morning_time_keeps_its_wall_clock_across_the_spring_change() -> None:
    launches = times(Daily(times=[LocalTime(9, 0)]), utc(2024, 3, 30, 0), 2, "Europe/Stockholm")

    assert launches == [utc(2024, 3, 30, 8), utc(2024, 3, 31, 7)]


def test_the_design_brief_monday_nine_in_stockholm_is_seven_or_eight_utc_by_season() -> None:
    launches = times(Weekly(days=[MON], times=[LocalTime(9, 0)]), utc(2024, 3, 20), 3, "Europe/Stockholm")

    assert launches == [utc(2024, 3, 25, 8), utc(2024, 4, 1, 7), utc(2024, 4, 8, 7)]


# -- America/New_York ----------------------------------------------------------------------------
def test_new_york_interval_slots_in_the_spring_gap_move_forward_and_merge_with_real_ones() -> None:
    every_30 = Interval(minutes=30, window_start=LocalTime(1, 0), window_end=LocalTime(3, 0))

    launches = times(every_30, utc(2024, 3, 10, 0), 5, "America/New_York")

    assert launches == [
        utc(2024, 3, 10, 6, 0),  # 01:00 EST
        utc(2024, 3, 10, 6, 30),  # 01:30 EST
        utc(2024, 3, 10, 7, 0),  # 02:00 -> 03:00 EDT, the same instant as the 03:00 slot: once
        utc(2024, 3, 10, 7, 30),  # 02:30 -> 03:30 EDT
        utc(2024, 3, 11, 5, 0),  # next day 01:00 EDT
    ]


def test_new_york_interval_slots_in_the_autumn_overlap_fire_once_each() -> None:
    every_30 = Interval(minutes=30, window_start=LocalTime(0, 30), window_end=LocalTime(2, 0))

    launches = times(every_30, utc(2024, 11, 3, 0), 4, "America/New_York")

    assert launches == [
        utc(2024, 11, 3, 4, 30),  # 00:30 EDT
        utc(2024, 11, 3, 5, 0),  # 01:00 EDT (not again at 01:00 EST)
        utc(2024, 11, 3, 5, 30),  # 01:30 EDT (not again at 01:30 EST)
        utc(2024, 11, 3, 7, 0),  # 02:00 EST
    ]


def test_a_new_york_daily_time_in_the_spring_gap_moves_forward() -> None:
    launches = times(Daily(times=[LocalTime(2, 15)]), utc(2024, 3, 9, 12), 2, "America/New_York")

    assert launches == [utc(2024, 3, 10, 7, 15), utc(2024, 3, 11, 6, 15)]  # 03:15 EDT, then 02:15 EDT


# -- days, weeks, months -------------------------------------------------------------------------
def test_weekdays_only_skip_the_weekend() -> None:
    weekdays = Daily(days=[MON, TUE, WED, THU, FRI], times=[LocalTime(9, 0)])

    launches = times(weekdays, utc(2024, 3, 1, 8), 3)  # Friday 1 March 2024, before 09:00

    assert launches == [utc(2024, 3, 1, 9), utc(2024, 3, 4, 9), utc(2024, 3, 5, 9)]


def test_several_chosen_times_a_day_come_in_time_order() -> None:
    launches = times(Daily(times=[LocalTime(18, 0), LocalTime(8, 0), LocalTime(12, 30)]), utc(2024, 5, 1), 4)

    assert launches == [utc(2024, 5, 1, 8), utc(2024, 5, 1, 12, 30), utc(2024, 5, 1, 18), utc(2024, 5, 2, 8)]


def test_every_other_week_counts_weeks_from_the_validity_start() -> None:
    schedule = Weekly(every=2, days=[MON, THU], times=[LocalTime(10, 0)])
    start = utc(2024, 1, 3)  # a Wednesday: its week (from Monday 1 January) is week 0

    launches = times(schedule, utc(2023, 12, 1), 5, valid_from=start)

    assert launches == [
        utc(2024, 1, 4, 10),
        utc(2024, 1, 15, 10),
        utc(2024, 1, 18, 10),
        utc(2024, 1, 29, 10),
        utc(2024, 2, 1, 10),
    ]


def test_the_last_day_of_the_month_follows_month_lengths_and_leap_years() -> None:
    launches = times(Monthly(last_day=True, times=[LocalTime(20, 0)]), utc(2024, 1, 15), 4)

    assert launches == [utc(2024, 1, 31, 20), utc(2024, 2, 29, 20), utc(2024, 3, 31, 20), utc(2024, 4, 30, 20)]


def test_day_31_skips_the_months_without_one() -> None:
    launches = times(Monthly(day_of_month=31, times=[LocalTime(6, 0)]), utc(2024, 1, 1), 4)

    assert launches == [utc(2024, 1, 31, 6), utc(2024, 3, 31, 6), utc(2024, 5, 31, 6), utc(2024, 7, 31, 6)]


def test_the_second_tuesday_of_each_month() -> None:
    launches = times(Monthly(ordinal=2, weekday=TUE, times=[LocalTime(9, 0)]), utc(2024, 1, 1), 4)

    assert launches == [utc(2024, 1, 9, 9), utc(2024, 2, 13, 9), utc(2024, 3, 12, 9), utc(2024, 4, 9, 9)]


def test_the_last_friday_of_each_month() -> None:
    launches = times(Monthly(ordinal=-1, weekday=FRI, times=[LocalTime(9, 0)]), utc(2024, 1, 1), 5)

    assert launches == [
        utc(2024, 1, 26, 9),
        utc(2024, 2, 23, 9),
        utc(2024, 3, 29, 9),
        utc(2024, 4, 26, 9),
        utc(2024, 5, 31, 9),
    ]


def test_a_fifth_monday_exists_only_in_some_months() -> None:
    launches = times(Monthly(ordinal=5, weekday=MON, times=[LocalTime(9, 0)]), utc(2024, 1, 1), 5)

    assert [t.date().isoformat() for t in launches] == [
        "2024-01-29",
        "2024-04-29",
        "2024-07-29",
        "2024-09-30",
        "2024-12-30",
    ]


def test_the_validity_window_bounds_launches_on_both_sides() -> None:
    launches = times(
        Daily(times=[LocalTime(9, 0)]),
        utc(2023, 12, 1),
        10,
        valid_from=utc(2024, 1, 1, 9),
        valid_until=utc(2024, 1, 3, 9),
    )

    assert launches == [utc(2024, 1, 1, 9), utc(2024, 1, 2, 9), utc(2024, 1, 3, 9)]


def test_launches_are_strictly_after_the_given_time() -> None:
    assert next_launch(Schedule(recurrence=Daily(times=[LocalTime(9, 0)])), utc(2024, 1, 1, 9)) == utc(2024, 1, 2, 9)


def test_a_once_schedule_launches_at_its_start_time_only_if_it_is_later() -> None:
    once = Schedule(start_time=utc(2024, 6, 1, 12))

    assert launch_times(once, utc(2024, 5, 1), 3) == [utc(2024, 6, 1, 12)]
    assert launch_times(once, utc(2024, 7, 1), 3) == []


# -- validation ----------------------------------------------------------------------------------
def violation_fields(schedule: Schedule, minimum: int = 15) -> list[str]:
    return [v.field for v in schedule_violations(schedule, "campaign.schedule", minimum)]


def test_an_interval_below_the_minimum_names_the_interval() -> None:
    assert violation_fields(Schedule(recurrence=Interval(minutes=10))) == [
        "campaign.schedule.interval.interval_minutes"
    ]


def test_the_minimum_interval_is_configurable() -> None:
    assert violation_fields(Schedule(recurrence=Interval(minutes=10)), minimum=5) == []


def test_two_times_of_a_day_closer_than_the_minimum_name_the_later_one() -> None:
    schedule = Schedule(recurrence=Daily(times=[LocalTime(9, 0), LocalTime(9, 10)]))

    assert violation_fields(schedule) == ["campaign.schedule.daily.times[1]"]


@pytest.mark.parametrize(
    ("recurrence", "field"),
    [
        (Daily(times=[]), "campaign.schedule.daily.times"),
        (Daily(times=[LocalTime(24, 0)]), "campaign.schedule.daily.times[0]"),
        (Daily(days=[0], times=[LocalTime(9, 0)]), "campaign.schedule.daily.days[0]"),
        (Weekly(days=[], times=[LocalTime(9, 0)]), "campaign.schedule.weekly.days"),
        (Weekly(every=53, days=[MON], times=[LocalTime(9, 0)]), "campaign.schedule.weekly.interval_weeks"),
        (Monthly(times=[LocalTime(9, 0)]), "campaign.schedule.monthly.day"),
        (Monthly(day_of_month=32, times=[LocalTime(9, 0)]), "campaign.schedule.monthly.day_of_month"),
        (Monthly(ordinal=6, weekday=MON, times=[LocalTime(9, 0)]), "campaign.schedule.monthly.nth_weekday.ordinal"),
        (
            Interval(minutes=30, window_start=LocalTime(18, 0), window_end=LocalTime(8, 0)),
            "campaign.schedule.interval.window_end",
        ),
    ],
)
def test_a_bad_recurrence_names_its_field(recurrence: Recurrence, field: str) -> None:
    assert violation_fields(Schedule(recurrence=recurrence)) == [field]


def test_a_validity_window_that_ends_before_it_starts_is_named() -> None:
    schedule = Schedule(recurrence=Daily(times=[LocalTime(9)]), valid_from=utc(2024, 2, 1), valid_until=utc(2024, 1, 1))

    assert violation_fields(schedule) == ["campaign.schedule.validity_end_time"]


def test_a_campaign_with_a_bad_schedule_is_invalid_argument() -> None:
    canvas = Canvas(
        activities=[Activity("a", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers")))],
        schedule=Schedule(time_zone="Europe/Stockholm", recurrence=Interval(minutes=5)),
    )

    with pytest.raises(InvalidArgument) as caught:
        validate_campaign("", canvas, Limits())

    assert [v.field for v in caught.value.violations] == ["campaign.schedule.interval.interval_minutes"]
    validate_campaign("", canvas, Limits(min_schedule_interval_minutes=5))
