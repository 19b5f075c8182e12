"""Launch times of a campaign schedule, computed with :mod:`zoneinfo` (no recurrence library).

A recurrence names wall-clock times on some local dates of the schedule's IANA time zone. Each
(date, time) becomes one instant:

- a time that does not exist that day (the clocks jump forward over it) moves forward by the jump —
  02:30 on the day Europe/Stockholm moves from 02:00 to 03:00 launches at 03:30 local time; this is
  Python's ``fold=0`` reading of a non-existent time (the offset from before the transition);
- a time that occurs twice (the clocks go back) launches once, at its first occurrence (``fold=0``);
- two times of a day that land on the same instant (a moved-forward time and a real one) launch once.

Dates are scanned one by one from the day before the lower bound, so the computation never depends on
where a previous scan stopped; it stops after :data:`HORIZON_DAYS` days or at the validity end.
"""

from __future__ import annotations

import calendar
import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from carillon_chassis.errors import FieldViolation
from scheduler_svc.model import Daily, Interval, LocalTime, Monthly, Recurrence, Schedule, Weekly

HORIZON_DAYS = 3660
MAX_WEEKS = 52
# Weeks of a weekly schedule without a validity start are counted from this Monday.
WEEK_EPOCH = date(1970, 1, 5)
LAST_MINUTE = LocalTime(23, 59)


def zone_of(schedule: Schedule) -> ZoneInfo:
    """The schedule's time zone (UTC when unset); the name must have been validated."""
    return ZoneInfo(schedule.time_zone or "UTC")


def instant(day: date, at: LocalTime, zone: ZoneInfo) -> datetime:
    """The UTC instant of a local date and time: a skipped time moves forward, a repeated one is the first."""
    local = datetime.combine(day, time(at.hour, at.minute), tzinfo=zone).replace(fold=0)
    return local.astimezone(UTC)


def _day_matches(days: list[int], day: date) -> bool:
    return not days or day.isoweekday() in days


def local_times_on(recurrence: Recurrence, day: date, anchor: date) -> list[LocalTime]:
    """The wall-clock launch times of ``recurrence`` on a local date (``anchor``: week counting start)."""
    if isinstance(recurrence, Daily):
        return list(recurrence.times) if _day_matches(recurrence.days, day) else []
    if isinstance(recurrence, Interval):
        if not _day_matches(recurrence.days, day) or recurrence.minutes <= 0:
            return []
        start = (recurrence.window_start or LocalTime(0, 0)).minutes
        end = (recurrence.window_end or LAST_MINUTE).minutes
        return [LocalTime(m // 60, m % 60) for m in range(start, end + 1, recurrence.minutes)]
    if isinstance(recurrence, Weekly):
        weeks = (day - timedelta(days=day.weekday()) - (anchor - timedelta(days=anchor.weekday()))).days // 7
        if weeks < 0 or weeks % max(recurrence.every, 1) or day.isoweekday() not in recurrence.days:
            return []
        return list(recurrence.times)
    last = calendar.monthrange(day.year, day.month)[1]
    if recurrence.day_of_month:
        hit = day.day == recurrence.day_of_month
    elif recurrence.last_day:
        hit = day.day == last
    else:
        hit = day.isoweekday() == recurrence.weekday and (
            day.day + 7 > last if recurrence.ordinal == -1 else (day.day - 1) // 7 + 1 == recurrence.ordinal
        )
    return list(recurrence.times) if hit else []


def _recurring(schedule: Schedule, recurrence: Recurrence, after: datetime) -> Iterator[datetime]:
    zone = zone_of(schedule)
    lower = max(after, schedule.valid_from) if schedule.valid_from else after
    anchor = schedule.valid_from.astimezone(zone).date() if schedule.valid_from else WEEK_EPOCH
    day = lower.astimezone(zone).date() - timedelta(days=1)
    last_day = day + timedelta(days=HORIZON_DAYS)
    if schedule.valid_until is not None:
        last_day = min(last_day, schedule.valid_until.astimezone(zone).date() + timedelta(days=1))
    while day <= last_day:
        launches = sorted({instant(day, at, zone) for at in local_times_on(recurrence, day, anchor)})
        for launch in launches:
            if launch <= after or (schedule.valid_from is not None and launch < schedule.valid_from):
                continue
            if schedule.valid_until is not None and launch > schedule.valid_until:
                return
            yield launch
        day += timedelta(days=1)


def launch_times(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    """The first ``count`` launch times strictly after ``after``, earliest first (UTC).

    A once schedule launches at its start time, or at ``after`` itself when it has none (as soon as it
    is published).
    """
    if count <= 0:
        return []
    recurrence = schedule.recurrence
    if recurrence is None:
        start = schedule.start_time
        if start is None:
            return [after]
        return [start] if start > after else []
    found: list[datetime] = []
    for launch in _recurring(schedule, recurrence, after):
        found.append(launch)
        if len(found) == count:
            break
    return found


def next_launch(schedule: Schedule, after: datetime) -> datetime | None:
    """The first launch time of a recurring schedule strictly after ``after``; None when none is left."""
    found = launch_times(schedule, after, 1) if schedule.recurrence is not None else []
    return found[0] if found else None


# -- validation -------------------------------------------------------------------------------
def _time_violations(at: LocalTime | None, path: str) -> list[FieldViolation]:
    if at is None or (0 <= at.hour <= 23 and 0 <= at.minute <= 59):
        return []
    return [FieldViolation(path, f"hours 0 to 23 and minutes 0 to 59; got {at.hour:02d}:{at.minute:02d}")]


def _days_violations(days: list[int], path: str, required: bool) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if required and not days:
        violations.append(FieldViolation(path, "at least one day is required"))
    seen: set[int] = set()
    for i, day in enumerate(days):
        if not 1 <= day <= 7:
            violations.append(FieldViolation(f"{path}[{i}]", "a day of the week must be set"))
        elif day in seen:
            violations.append(FieldViolation(f"{path}[{i}]", "this day is listed twice"))
        seen.add(day)
    return violations


def _times_violations(times: list[LocalTime], path: str, min_interval_minutes: int) -> list[FieldViolation]:
    if not times:
        return [FieldViolation(path, "at least one time of day is required")]
    violations: list[FieldViolation] = []
    for i, at in enumerate(times):
        violations += _time_violations(at, f"{path}[{i}]")
    if violations:
        return violations
    ordered = sorted(times)
    for earlier, later in itertools.pairwise(ordered):
        if later.minutes - earlier.minutes < min_interval_minutes:
            index = times.index(later)
            violations.append(
                FieldViolation(
                    f"{path}[{index}]",
                    f"times of a day are at least {min_interval_minutes} minutes apart "
                    f"(min_schedule_interval_minutes); {earlier.hour:02d}:{earlier.minute:02d} and "
                    f"{later.hour:02d}:{later.minute:02d} are not",
                )
            )
    return violations


def schedule_violations(schedule: Schedule, path: str, min_interval_minutes: int = 15) -> list[FieldViolation]:
    """Every problem of a schedule; ``path`` is its field path (``campaign.schedule``)."""
    violations: list[FieldViolation] = []
    zone = schedule.time_zone
    if zone:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            violations.append(FieldViolation(f"{path}.time_zone", f"{zone!r} is not an IANA time zone"))
    r = schedule.recurrence
    if isinstance(r, Daily):
        violations += _days_violations(r.days, f"{path}.daily.days", required=False)
        violations += _times_violations(r.times, f"{path}.daily.times", min_interval_minutes)
    elif isinstance(r, Interval):
        violations += _days_violations(r.days, f"{path}.interval.days", required=False)
        if r.minutes < min_interval_minutes:
            violations.append(
                FieldViolation(
                    f"{path}.interval.interval_minutes",
                    f"at least {min_interval_minutes} minutes (min_schedule_interval_minutes); got {r.minutes}",
                )
            )
        violations += _time_violations(r.window_start, f"{path}.interval.window_start")
        violations += _time_violations(r.window_end, f"{path}.interval.window_end")
        if (r.window_start or LocalTime(0, 0)) > (r.window_end or LAST_MINUTE):
            violations.append(FieldViolation(f"{path}.interval.window_end", "the window ends before it starts"))
    elif isinstance(r, Weekly):
        if not 1 <= r.every <= MAX_WEEKS:
            violations.append(FieldViolation(f"{path}.weekly.interval_weeks", f"0 (every week) or 1 to {MAX_WEEKS}"))
        violations += _days_violations(r.days, f"{path}.weekly.days", required=True)
        violations += _times_violations(r.times, f"{path}.weekly.times", min_interval_minutes)
    elif isinstance(r, Monthly):
        if not (r.day_of_month or r.last_day or r.ordinal):
            violations.append(
                FieldViolation(f"{path}.monthly.day", "one of day_of_month, last_day or nth_weekday is required")
            )
        elif r.day_of_month and not 1 <= r.day_of_month <= 31:
            violations.append(FieldViolation(f"{path}.monthly.day_of_month", "1 to 31"))
        elif r.ordinal:
            if r.ordinal not in (1, 2, 3, 4, 5, -1):
                violations.append(FieldViolation(f"{path}.monthly.nth_weekday.ordinal", "1 to 5, or -1 for the last"))
            if not 1 <= r.weekday <= 7:
                violations.append(
                    FieldViolation(f"{path}.monthly.nth_weekday.weekday", "a day of the week must be set")
                )
        violations += _times_violations(r.times, f"{path}.monthly.times", min_interval_minutes)
    if r is not None and schedule.start_time is not None:
        violations.append(FieldViolation(f"{path}.once.start_time", "a recurring schedule has no once start time"))
    if schedule.valid_from and schedule.valid_until and schedule.valid_until <= schedule.valid_from:
        violations.append(FieldViolation(f"{path}.validity_end_time", "the validity window ends before it starts"))
    return violations
