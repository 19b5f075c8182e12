"""Send windows in the recipient's local time.

A :class:`SendWindow` opens every day (or on the given ISO weekdays) from a local start time to a
local end time; an end earlier than the start spans midnight (the weekday is the day it opens).
:meth:`SendWindow.next_opening` says whether an instant is inside the window in a time zone and, if
not, when the window next opens (as UTC), so that a recipient outside it is deferred, not dropped.
Local times that fall in a DST gap or fold are resolved by ``zoneinfo``'s defaults (fold 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from carillon_chassis.errors import FieldViolation

_HH_MM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def parse_local_time(text: str) -> time | None:
    """``HH:MM`` as a time, or None when malformed."""
    match = _HH_MM.match(text)
    return time(int(match.group(1)), int(match.group(2))) if match else None


def time_zone(name: str) -> ZoneInfo | None:
    """The IANA zone ``name``, or None when unknown or empty."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class SendWindow:
    """A daily (or weekly) window of local time."""

    start: time
    end: time
    days: frozenset[int] = frozenset()  # ISO weekdays; every day when empty
    default_zone: str = "UTC"

    @staticmethod
    def check(start: str, end: str, days: list[int], default_zone: str, where: str) -> list[FieldViolation]:
        """The problems of a window given as in the API."""
        violations: list[FieldViolation] = []
        parsed_start, parsed_end = parse_local_time(start), parse_local_time(end)
        if parsed_start is None:
            violations.append(FieldViolation(f"{where}.start_local_time", "must be HH:MM"))
        if parsed_end is None:
            violations.append(FieldViolation(f"{where}.end_local_time", "must be HH:MM"))
        if parsed_start is not None and parsed_start == parsed_end:
            violations.append(FieldViolation(f"{where}.end_local_time", "must differ from the start"))
        if any(d < 1 or d > 7 for d in days):
            violations.append(FieldViolation(f"{where}.days_of_week", "days are 1 (Monday) to 7 (Sunday)"))
        if default_zone and time_zone(default_zone) is None:
            violations.append(FieldViolation(f"{where}.default_time_zone", "not a known IANA time zone"))
        return violations

    def zone(self, name: str) -> ZoneInfo:
        """The zone of a profile: its own when valid, else the window's default, else UTC."""
        return time_zone(name) or time_zone(self.default_zone) or ZoneInfo("UTC")

    def _interval(self, day: date, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
        if self.days and day.isoweekday() not in self.days:
            return None
        opens = datetime.combine(day, self.start, zone)
        closes_day = day + timedelta(days=1) if self.end <= self.start else day
        closes = datetime.combine(closes_day, self.end, zone)
        return opens.astimezone(UTC), closes.astimezone(UTC)

    def next_opening(self, now: datetime, zone_name: str) -> datetime | None:
        """None when ``now`` is inside the window in the zone; otherwise the next opening (UTC)."""
        zone = self.zone(zone_name)
        today = now.astimezone(zone).date()
        for offset in (-1, 0):
            interval = self._interval(today + timedelta(days=offset), zone)
            if interval is not None and interval[0] <= now < interval[1]:
                return None
        for offset in range(0, 9):
            interval = self._interval(today + timedelta(days=offset), zone)
            if interval is not None and interval[0] > now:
                return interval[0]
        raise AssertionError("a window with at least one day opens within 8 days")
