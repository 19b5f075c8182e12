"""Send windows in the recipient's local time: inside, outside, across midnight, weekdays, DST."""

from __future__ import annotations

from datetime import UTC, datetime, time

from delivery_svc.windows import SendWindow

NINE_TO_FIVE = SendWindow(time(9), time(17))


def test_an_instant_inside_the_window_in_the_recipients_zone_has_no_next_opening() -> None:
    now = datetime(2026, 6, 1, 1, 0, tzinfo=UTC)  # 10:00 in Tokyo

    assert NINE_TO_FIVE.next_opening(now, "Asia/Tokyo") is None


def test_an_instant_before_the_window_opens_waits_for_the_same_local_day() -> None:
    now = datetime(2026, 6, 1, 5, 0, tzinfo=UTC)  # 07:00 in Stockholm (CEST)

    assert NINE_TO_FIVE.next_opening(now, "Europe/Stockholm") == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)


def test_an_instant_after_the_window_closes_waits_for_the_next_local_day() -> None:
    now = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)  # 16:00 in New York (EDT): open
    later = datetime(2026, 6, 1, 22, 0, tzinfo=UTC)  # 18:00 in New York: closed

    assert NINE_TO_FIVE.next_opening(now, "America/New_York") is None
    assert NINE_TO_FIVE.next_opening(later, "America/New_York") == datetime(2026, 6, 2, 13, 0, tzinfo=UTC)


def test_a_window_across_midnight_is_open_on_both_sides_of_it() -> None:
    night = SendWindow(time(22), time(2))

    assert night.next_opening(datetime(2026, 6, 1, 23, 30, tzinfo=UTC), "UTC") is None
    assert night.next_opening(datetime(2026, 6, 2, 1, 30, tzinfo=UTC), "UTC") is None
    assert night.next_opening(datetime(2026, 6, 2, 3, 0, tzinfo=UTC), "UTC") == datetime(2026, 6, 2, 22, tzinfo=UTC)


def test_a_window_on_weekdays_only_skips_the_weekend() -> None:
    weekdays = SendWindow(time(9), time(17), frozenset({1, 2, 3, 4, 5}))
    saturday_noon = datetime(2026, 6, 6, 12, 0, tzinfo=UTC)

    assert saturday_noon.isoweekday() == 6
    assert weekdays.next_opening(saturday_noon, "UTC") == datetime(2026, 6, 8, 9, 0, tzinfo=UTC)


def test_a_profile_without_a_valid_zone_uses_the_windows_default_zone() -> None:
    window = SendWindow(time(9), time(17), default_zone="Asia/Tokyo")
    now = datetime(2026, 6, 1, 1, 0, tzinfo=UTC)  # 10:00 in Tokyo, 01:00 UTC

    assert window.next_opening(now, "") is None
    assert window.next_opening(now, "Not/AZone") is None
    assert window.next_opening(now, "UTC") == datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def test_the_opening_follows_the_local_clock_across_a_dst_change() -> None:
    # Stockholm moves from CET (UTC+1) to CEST (UTC+2) on 2026-03-29.
    before = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)

    assert NINE_TO_FIVE.next_opening(before, "Europe/Stockholm") == datetime(2026, 3, 29, 7, 0, tzinfo=UTC)


def test_a_malformed_window_names_each_bad_field() -> None:
    violations = SendWindow.check("9am", "17:00", [0, 8], "Mars/Olympus", "header.send_window")

    assert {v.field for v in violations} == {
        "header.send_window.start_local_time",
        "header.send_window.days_of_week",
        "header.send_window.default_time_zone",
    }
