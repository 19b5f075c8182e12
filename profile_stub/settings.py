"""Settings of profile_stub, from ``CARILLON_PROFILE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from carillon_chassis.settings import ServiceSettings


class ProfileSettings(ServiceSettings):
    """profile_stub settings: the common ones plus the consent policy for unknown consent."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_PROFILE_", extra="ignore", populate_by_name=True)

    service_name: str = "profile"
    port: int = 50054
    # Channels on which a profile with no recorded consent may receive marketing messages.
    # By default every channel requires an explicit opt-in.
    unknown_consent_allowed: list[str] = []
    max_eligibility_batch: int = 10000
    # Soft bounces in a row after which an address is quarantined.
    soft_bounce_limit: int = Field(default=5, ge=1, le=20)
    # How long a send reserved by CheckEligibility counts against the caps unless it is confirmed.
    reservation_ttl_s: float = Field(default=3600.0, gt=0)
