"""Capping rules: at most N marketing messages per channel (or across channels) per period.

A period is the current calendar day, ISO week (from Monday) or month, in UTC or in the profile's
time zone. Messages counted are the marketing communications sent in the period plus the unexpired
reservations made in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("day", "week", "month")
TIME_BASES = ("utc", "profile")
MAX_MESSAGES_LIMIT = 100000


@dataclass
class CappingRule:
    """One capping rule; an empty ``channel`` counts messages of every channel."""

    rule_id: str
    max_messages: int
    period: str
    channel: str = ""
    time_basis: str = "utc"
    create_time: datetime | None = None

    def applies_to(self, channel: str) -> bool:
        """True when a message on ``channel`` is limited by this rule."""
        return not self.channel or self.channel == channel


def zone(time_zone: str) -> ZoneInfo:
    """The profile's zone, or UTC when it has none or an unknown one."""
    if time_zone:
        try:
            return ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo("UTC")


def period_start(rule: CappingRule, now: datetime, time_zone: str) -> datetime:
    """The UTC instant at which the rule's current period began, for a profile in ``time_zone``."""
    tz = zone(time_zone) if rule.time_basis == "profile" else ZoneInfo("UTC")
    local = now.astimezone(tz)
    day = local.date()
    if rule.period == "week":
        day -= timedelta(days=day.weekday())
    elif rule.period == "month":
        day = day.replace(day=1)
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
