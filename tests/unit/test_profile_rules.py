"""profile_stub's pure rules: capping periods and quarantine transitions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from profile_stub.capping import CappingRule, period_start
from profile_stub.quarantine import Quarantine, apply

NOW = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # a Sunday; 03:30 CEST in Stockholm, after the DST switch


@pytest.mark.parametrize(
    ("period", "basis", "time_zone", "start"),
    [
        ("day", "utc", "Europe/Stockholm", datetime(2026, 3, 29, tzinfo=UTC)),
        ("day", "profile", "Europe/Stockholm", datetime(2026, 3, 28, 23, tzinfo=UTC)),  # CET midnight
        ("week", "utc", "", datetime(2026, 3, 23, tzinfo=UTC)),
        ("month", "profile", "America/New_York", datetime(2026, 3, 1, 5, tzinfo=UTC)),
        ("day", "profile", "", datetime(2026, 3, 29, tzinfo=UTC)),  # no zone: UTC
        ("day", "profile", "Not/AZone", datetime(2026, 3, 29, tzinfo=UTC)),
    ],
)
def test_a_period_starts_at_local_midnight_of_its_first_day(
    period: str, basis: str, time_zone: str, start: datetime
) -> None:
    assert period_start(CappingRule("r", 1, period, time_basis=basis), NOW, time_zone) == start


def test_soft_bounces_quarantine_at_the_limit_and_a_delivery_resets_the_count() -> None:
    state = Quarantine("email", "a@example.com")
    for kind in ("soft_bounce", "soft_bounce", "delivered", "soft_bounce", "soft_bounce"):
        apply(state, kind, 3, NOW)
    assert (state.quarantined, state.soft_bounces) == (False, 2)

    apply(state, "soft_bounce", 3, NOW)

    assert (state.quarantined, state.reason, state.quarantine_time) == (True, "soft_bounce", NOW)


def test_a_delivery_does_not_lift_a_hard_bounce_quarantine() -> None:
    state = apply(Quarantine("sms", "+46700000000"), "hard_bounce", 5, NOW)

    apply(state, "delivered", 5, NOW)

    assert (state.quarantined, state.reason) == (True, "hard_bounce")
